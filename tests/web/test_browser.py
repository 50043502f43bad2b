"""The frontend extension (web/js/dit_cache_bridge.js) in a real headless Chromium against a real ComfyUI.

Each test runs one scenario of ``driver.mjs`` (playwright-core, Debian's /usr/bin/chromium, a fresh
profile) against the session's ``comfy_server`` and asserts on the JSON it prints. Screenshots go to
test-artifacts/web/. Needs: ``apt-get install chromium`` and Node.js >= 20; playwright-core is
installed into tests/web/node_modules from package-lock.json on first use. Without Chromium or Node the
tests fail with the command that installs them (DCB_SKIP_BROWSER_TESTS=1 skips them on purpose).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import requests

import host

pytestmark = [pytest.mark.browser, pytest.mark.slow(seconds=170)]

WEB_TESTS = Path(__file__).resolve().parent
DRIVER = WEB_TESTS / "driver.mjs"
ARTIFACTS = host.REPO_ROOT / "test-artifacts" / "web"
CHROMIUM = Path(os.environ.get("DCB_CHROMIUM", "/usr/bin/chromium"))
PACK_NODES = ("DiTCacheBridge_LoadC2CProjector", "DiTCacheBridge_CreateC2CProjector", "DiTCacheBridge_CaptureKVCache", "DiTCacheBridge_FuseCaches", "DiTCacheBridge_BridgedKSampler")
# Settings for a clean first page: no template browser for a "new user", no minimap over the canvas.
UI_SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False}
INSPECTOR_COLOURS = ("strength", "k", "v")


SKIP_ENV = "DCB_SKIP_BROWSER_TESTS"


def _missing_tool(reason: str):
    """Fail with the fix: a green run must not hide that the UI was never tested. Opt out explicitly."""
    if os.environ.get(SKIP_ENV) == "1":
        pytest.skip(f"{reason} ({SKIP_ENV}=1)")
    pytest.fail(f"browser tests cannot run: {reason}. To skip them on purpose, set {SKIP_ENV}=1.", pytrace=False)


@pytest.fixture(scope="module")
def browser_tools() -> None:
    """Chromium, Node.js and playwright-core, or skip (fail under CI) saying which is missing."""
    if not CHROMIUM.exists():
        _missing_tool(f"{CHROMIUM} not found; install it with: apt-get update && apt-get install -y chromium")
    if shutil.which("node") is None or shutil.which("npm") is None:
        _missing_tool("node/npm not found; install them with: apt-get update && apt-get install -y nodejs npm")
    if not (WEB_TESTS / "node_modules" / "playwright-core").is_dir():
        result = subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=WEB_TESTS, capture_output=True,
                                text=True, timeout=180)
        if result.returncode != 0:
            pytest.fail(f"`npm ci` in tests/web failed:\n{result.stdout}\n{result.stderr}", pytrace=False)


@pytest.fixture(scope="module")
def ui_server(browser_tools, comfy_server):
    requests.post(f"{comfy_server.url}/settings", json=UI_SETTINGS, timeout=30).raise_for_status()
    return comfy_server


@pytest.fixture(scope="module")
def workflow(ui_server) -> dict:
    return pack_workflow(ui_server.object_info())


def run_steps(server, tmp_path: Path, steps: list[dict], timeout: float) -> list[dict]:
    """Run driver scenarios (``{"scenario": name, **options}``) one after another in one page of one fresh
    Chromium; their results, each checked only when a test asks for it (``checked``)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    job = {"url": server.url, "chromium": str(CHROMIUM), "profile": str(tmp_path / "profile"),
           "artifacts": str(ARTIFACTS), "steps": steps}
    job_path = tmp_path / "job.json"
    job_path.write_text(json.dumps(job), encoding="utf-8")
    proc = subprocess.run(["node", str(DRIVER), str(job_path)], cwd=WEB_TESTS, capture_output=True, text=True,
                          timeout=timeout)
    lines = proc.stdout.strip().splitlines()
    try:
        results = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        results = [{"error": f"the driver printed no result (exit {proc.returncode}):\n{proc.stdout}"}] * len(steps)
    return [dict(result, stderr=proc.stderr) for result in results]


def checked(result: dict, server, scenario: str) -> dict:
    """A step's result, or fail the test on its driver error or on an error the extension raised in the page."""
    if "error" in result:
        pytest.fail(f"driver '{scenario}' failed: {result['error']}\n--- stderr ---\n{result['stderr']}\n"
                    f"--- server log ---\n{server.log_tail(30)}", pytrace=False)
    own_errors = [e for e in result.get("pageErrors", []) if "dit_cache_bridge" in e]
    assert not own_errors, f"the extension raised in the page: {own_errors}"
    return result


def drive(scenario: str, server, tmp_path: Path, timeout: float = 90, **options) -> dict:
    """Run one driver scenario in a fresh Chromium; its checked result."""
    (result,) = run_steps(server, tmp_path, [{"scenario": scenario, **options}], timeout)
    return checked(result, server, scenario)


class Scenes:
    """Named driver steps run together in one Chromium, once for a module (``scene(name)`` in its tests)."""

    def __init__(self, server, tmp_path: Path, steps: dict[str, tuple[str, float, dict]]):
        """``steps``: name -> (scenario, timeout in seconds, options), run in this order."""
        self.server = server
        self.scenarios = {name: scenario for name, (scenario, _, _) in steps.items()}
        results = run_steps(server, tmp_path, [{"scenario": scenario, **options}
                                               for scenario, _, options in steps.values()],
                            timeout=sum(seconds for _, seconds, _ in steps.values()))
        self.results = dict(zip(steps, results))

    def __call__(self, name: str) -> dict:
        return checked(self.results[name], self.server, self.scenarios[name])


# --------------------------------------------------------------------------------------------------
# A UI-format workflow, built from the pack's nodes
# --------------------------------------------------------------------------------------------------

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


class UIWorkflow:
    """Just enough of the graph editor's workflow format (version 0.4) to load and queue a graph.

    Nodes are described by name (widget values, links by input name); sockets and the order of
    ``widgets_values`` come from the server's /object_info, the way the frontend lays them out
    (an INT named seed/noise_seed or marked control_after_generate is followed by its control
    widget), so the graph keeps loading when a node gains an optional input.
    """

    def __init__(self, object_info: dict):
        self.info = object_info
        self.nodes: dict[int, dict] = {}
        self.links: list[list] = []

    def _inputs(self, node_type: str):
        spec = self.info[node_type]
        for section in ("required", "optional"):
            for name in spec.get("input_order", {}).get(section, []):
                kind, options = (spec["input"][section][name] + [{}])[:2]
                if isinstance(kind, list):  # a combo given as its list of choices
                    kind, options = "COMBO", {"options": kind, **options}
                yield name, kind, options, kind in WIDGET_TYPES and not options.get("forceInput")

    def add(self, node_id: int, node_type: str, pos=(0, 0), **widgets) -> "UIWorkflow":
        sockets, values = [], []
        for name, kind, options, is_widget in self._inputs(node_type):
            if not is_widget:
                sockets.append({"name": name, "type": kind, "link": None})
                continue
            if name in widgets:
                value = widgets.pop(name)
            elif "default" in options:
                value = options["default"]
            else:
                value = (options.get("options") or [""])[0]
            values.append(value)
            if kind == "INT" and options.get("control_after_generate", name in ("seed", "noise_seed")):
                values.append("fixed")
        assert not widgets, f"{node_type} has no widgets {sorted(widgets)}"
        outputs = self.info[node_type]["output"]
        self.nodes[node_id] = {
            "id": node_id, "type": node_type, "pos": list(pos), "size": [300, 200], "flags": {},
            "order": len(self.nodes), "mode": 0, "inputs": sockets,
            "outputs": [{"name": kind, "type": kind, "links": [], "slot_index": i} for i, kind in enumerate(outputs)],
            "properties": {"Node name for S&R": node_type}, "widgets_values": values,
        }
        return self

    def link(self, source: int, target: int, input_name: str, slot: int = 0) -> "UIWorkflow":
        link_id = len(self.links) + 1
        out = self.nodes[source]["outputs"][slot]
        inputs = self.nodes[target]["inputs"]
        (index,) = [i for i, inp in enumerate(inputs) if inp["name"] == input_name]
        inputs[index]["link"] = link_id
        out["links"].append(link_id)
        self.links.append([link_id, source, slot, target, index, out["type"]])
        return self

    def to_json(self) -> dict:
        return {"last_node_id": max(self.nodes), "last_link_id": len(self.links), "nodes": list(self.nodes.values()),
                "links": self.links, "groups": [], "config": {}, "extra": {}, "version": 0.4}


FUSE, BRIDGED = 7, 11  # node ids of the inspected nodes in pack_workflow()


def pack_workflow(object_info: dict) -> dict:
    """All five pack nodes: two tiny Wan models bridged through Fuse Caches → KSampler and Bridged KSampler.

    Load C2C Projector stands alone (the test server has no projector files), so queueing runs
    both bridged branches and nothing else.
    """
    sampling = dict(seed=7, steps=3, cfg=4.0, sampler_name="euler", scheduler="simple", denoise=1.0)
    wf = UIWorkflow(object_info)
    wf.add(1, "UNETLoader", (0, 0), unet_name=host.T2V_A, weight_dtype="default")
    wf.add(2, "UNETLoader", (0, 150), unet_name=host.T2V_B, weight_dtype="default")
    wf.add(3, "DCBTestWanConditioning", (0, 300), seed=1, length=8, batch_size=1)
    wf.add(4, "DCBTestWanConditioning", (0, 480), seed=2, length=5, batch_size=1)
    wf.add(5, "DiTCacheBridge_CreateC2CProjector", (350, 0), kind="weighted", mapping="identity", layers="all", alpha=0.5, seed=0)
    wf.add(6, "DiTCacheBridge_CaptureKVCache", (350, 280), layers="auto", refresh_every=1)
    wf.add(FUSE, "DiTCacheBridge_FuseCaches", (700, 0), strength=1.0, start_percent=0.0, end_percent=1.0, ramp="constant")
    wf.add(8, "EmptyHunyuanLatentVideo", (0, 660), width=64, height=64, length=9, batch_size=1)
    wf.add(9, "KSampler", (1050, 0), **sampling)
    wf.add(10, "SaveLatent", (1400, 0), filename_prefix="web_test/fuse_caches")
    wf.add(BRIDGED, "DiTCacheBridge_BridgedKSampler", (700, 560), strength=0.6, start_percent=0.0, end_percent=1.0,
           ramp="linear_down", **sampling)
    wf.add(12, "SaveLatent", (1050, 660), filename_prefix="web_test/bridged_ksampler")
    wf.add(13, "DiTCacheBridge_LoadC2CProjector", (0, 860))
    (wf.link(2, 5, "sharer").link(1, 5, "receiver")
       .link(2, 6, "sharer").link(3, 6, "positive").link(4, 6, "negative")
       .link(1, FUSE, "model").link(6, FUSE, "kv_source").link(5, FUSE, "projector")
       .link(FUSE, 9, "model").link(3, 9, "positive").link(4, 9, "negative").link(8, 9, "latent_image")
       .link(9, 10, "samples")
       .link(1, BRIDGED, "receiver").link(3, BRIDGED, "positive").link(4, BRIDGED, "negative")
       .link(2, BRIDGED, "sharer").link(3, BRIDGED, "sharer_positive").link(4, BRIDGED, "sharer_negative")
       .link(5, BRIDGED, "projector").link(8, BRIDGED, "latent_image")
       .link(BRIDGED, 12, "samples"))
    return wf.to_json()


def shipped_workflows() -> dict[str, dict]:
    return {path.name: json.loads(path.read_text(encoding="utf-8"))
            for path in sorted((host.REPO_ROOT / "workflows").glob("*.json"))}


def is_stock_node(node_type: str, comfyui: Path) -> bool:
    """True when ComfyUI's own source names the node type (a stock node that failed to import here)."""
    pattern = re.compile(rf"""["']{re.escape(node_type)}["']""")
    roots = [comfyui / "nodes.py", *(comfyui / "comfy_extras").glob("*.py"), *(comfyui / "comfy_api_nodes").rglob("*.py")]
    return any(pattern.search(p.read_text(encoding="utf-8", errors="replace")) for p in roots if p.is_file())


def synthetic_report(layers: int) -> dict:
    """A report as the backend sends it: JSON object keys are strings."""
    return {
        "layers": list(range(layers)),
        "strength": {str(i): 1.0 - i / (2 * layers) for i in range(layers)},
        "k_change": {str(i): 0.05 + 0.01 * (i % 7) for i in range(layers)},
        "v_change": {str(i): 0.02 + 0.015 * (i % 5) for i in range(layers)},
        "sharer_forwards": 12, "model_calls": 12,
    }


# --------------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------------

RENDERER_NAMES = ("canvas", "vue")
RENDERERS = pytest.mark.parametrize("renderer", RENDERER_NAMES)
RENDERER_SEEDS = {"canvas": 0, "vue": 1}
UNTRAINED = {**synthetic_report(3), "warnings": ["untrained 'c2c' projector (random initial weights)"]}
SYNTHETIC_EVENTS = [[BRIDGED, {"layers": []}], [FUSE, synthetic_report(40)], [BRIDGED, UNTRAINED]]


def with_control(workflow: dict) -> dict:
    """The workflows the load test opens: the pack workflow, a copy naming a missing node type (proves the
    check sees one) and every shipped workflow."""
    control = json.loads(json.dumps(workflow))
    control["nodes"][0]["type"] = "DCBNoSuchNode"
    return {"pack_workflow": workflow, "control": control, **shipped_workflows()}


def seeded_for(workflow: dict, renderer: str) -> dict:
    """The pack workflow with a new seed per renderer, or the server would answer the second run from its cache
    (seed is the first widget of both samplers)."""
    run = json.loads(json.dumps(workflow))
    for node in run["nodes"]:
        if node["id"] in (9, BRIDGED):
            node["widgets_values"][0] = 7 + RENDERER_SEEDS[renderer]
    return run


@pytest.fixture(scope="module")
def scene(ui_server, workflow, tmp_path_factory) -> Scenes:
    """Every test's scenario in one Chromium (one app load instead of eight). Loading the workflows comes first,
    on the freshly loaded app: on ComfyUI 0.33.0's frontend, after the search step had added a node, a shipped
    workflow opened on a view that hid its notes (the check is about the view a new user gets)."""
    steps = {"load": ("load", 90, dict(workflows=with_control(workflow))),
             "search": ("search", 90, dict(query="Fuse Caches", expect="Fuse Caches"))}
    for renderer in RENDERER_NAMES:
        steps[f"live {renderer}"] = ("live", 330, dict(timeout_ms=240_000, inspect=[FUSE, BRIDGED], renderer=renderer,
                                                       workflows={"run": seeded_for(workflow, renderer)}))
    for renderer in RENDERER_NAMES:
        steps[f"synthetic {renderer}"] = ("synthetic", 90, dict(events=SYNTHETIC_EVENTS, inspect=[FUSE, BRIDGED],
                                                                workflows={"run": workflow}, renderer=renderer))
    for renderer in RENDERER_NAMES:
        steps[f"layout {renderer}"] = ("layout", 150, dict(workflows=shipped_workflows(), renderer=renderer))
    return Scenes(ui_server, tmp_path_factory.mktemp("browser"), steps)


def test_fuse_caches_is_found_by_the_node_search_and_gets_the_pack_colours(scene):
    result = scene("search")
    assert any(option.startswith("Fuse Caches") for option in result["options"]), result["options"]
    (added,) = result["added"]
    assert added["type"] == "DiTCacheBridge_FuseCaches"
    assert added["color"] and added["bgcolor"], f"pack colours not applied: {added}"
    assert added["size"][1] >= added["minSize"][1] - 1, f"a new Fuse Caches is shorter than its widgets: {added}"
    assert not any(w.startswith("backward_") for w in added["widgets"]), "backward_* shown for one-way fusion"


def test_workflows_load_without_missing_node_warning(scene, ui_server):
    result = scene("load")
    assert result["control"]["missing"] == ["DCBNoSuchNode"], result["control"]
    assert any("missing node" in d.lower() for d in result["control"]["dialogs"]), result["control"]["dialogs"]
    pack = result["pack_workflow"]
    assert pack["missing"] == [] and pack["unregistered"] == [] and pack["dialogs"] == [], pack
    assert set(PACK_NODES) <= set(pack["types"])
    fuse, sampler, capture = (pack["widgets"][str(i)] for i in (FUSE, 9, 6))
    assert (fuse["strength"], fuse["ramp"], sampler["steps"], capture["layers"]) == (1.0, "constant", 3, "auto"), \
        "widget values landed on the wrong widgets"
    for name in shipped_workflows():
        missing = [t for t in result[name]["missing"] if not is_stock_node(t, ui_server.comfyui)]
        assert missing == [], f"workflows/{name} has node types this server does not know: {missing}"
        # Missing model files (the real 14B models) are expected here; a missing-node dialog is not.
        assert not any("missing node" in d.lower() for d in result[name]["dialogs"]), result[name]["dialogs"]
        view = result[name]["view"]
        assert view["scale"] >= 0.6, f"workflows/{name} opens at {view['scale']:.0%}, where node text is not drawn"
        hidden = [n["id"] for n in view["notes"] if n["hidden"]]
        assert not hidden, f"workflows/{name} opens on a view that hides its notes {hidden} (left of or above it)"
        about = [n for n in view["notes"] if n["title"] == "About this workflow"]
        assert about and about[0]["onScreen"], f"workflows/{name}: 'About this workflow' is not on the first screen"


def check_inspector_shown(node: dict) -> None:
    assert node["widget"] and node["visible"], f"inspector widget not on screen: {node}"
    assert all(node["barPixels"][c] > 0 for c in INSPECTOR_COLOURS), f"inspector not drawn: {node}"
    assert node["overlaps"] == [], f"inspector of node {node['id']} meets nodes {node['overlaps']}"


@RENDERERS
def test_inspector_draws_the_report_of_a_live_run(scene, ui_server, renderer):
    layers = host.TinyModels.spec(host.T2V_A)["num_layers"]
    result = scene(f"live {renderer}")
    assert (result["vueNodes"] > 0) == (renderer == "vue"), result["vueNodes"]
    assert result["loaded"]["missing"] == []
    assert result["reported"], (f"no dit_cache_bridge.report reached the inspected nodes; events seen: "
                                f"{result['events']}\n--- server log ---\n{ui_server.log_tail(40)}")
    for node in result["nodes"]:
        report = node["report"]
        assert report["layers"] == list(range(layers)), node
        assert report["modelCalls"] > 0 and report["sharerForwards"] > 0, node
        assert all(s > 0 for s in report["strength"]) and all(k > 0 for k in report["k"]), node
        assert report["warnings"] == [], "a weighted projector is training-free: no warning"
        check_inspector_shown(node)
    assert result["savedAfter"] == result["savedBefore"], "a report must not change what the workflow saves"
    assert all(Path(p).is_file() for p in result["screenshots"])


@RENDERERS
def test_inspector_draws_a_synthetic_report_and_ignores_an_empty_one(scene, renderer):
    result = scene(f"synthetic {renderer}")
    empty, forty, three = result["nodes"]
    assert empty["report"] is None and empty["barPixels"] == {"strength": 0, "k": 0, "v": 0}
    assert forty["report"]["layers"] == list(range(40)) and forty["report"]["sharerForwards"] == 12
    assert three["report"]["layers"] == [0, 1, 2] and three["report"]["warnings"] == UNTRAINED["warnings"]
    assert three["warningPixels"] > 0 and forty["warningPixels"] == 0, "the warning line is drawn in its colour"
    assert not any("untrained" in t for t in result["toasts"][1]), "a report without warnings raises no toast"
    assert any(UNTRAINED["warnings"][0] in t for t in result["toasts"][2]), f"no toast: {result['toasts'][2]}"
    for node, before in ((empty, result["before"][1]), (forty, result["before"][0]), (three, result["before"][1])):
        assert node["size"] == before, "a report must never resize the node (it would slide under its neighbours)"
    for node in (forty, three):
        check_inspector_shown(node)
    assert all(Path(p).is_file() for p in result["screenshots"])


@RENDERERS
def test_shipped_workflows_leave_the_inspector_clear_of_other_nodes(scene, renderer):
    result = scene(f"layout {renderer}")
    inspected = 0
    for name, nodes in result["results"].items():
        for node in nodes:
            assert node["widget"] and node["visible"], f"{name}: inspector of node {node['id']} not shown: {node}"
            assert node["overlaps"] == [], (f"{name}: inspector of node {node['id']} meets nodes {node['overlaps']} "
                                            f"(size {node['size']}, minimum {node['minSize']}, at {node['graphRect']})")
            inspected += 1
    assert inspected >= 3
