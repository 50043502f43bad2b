"""Turn a UI-format workflow (what the graph editor saves) into an API prompt, and swap in tiny models.

Two pure functions do the work; nothing here talks to a server or imports ComfyUI:

    api = to_api(workflow, object_info)            # UI graph + GET /object_info -> POST /prompt graph
    api = substitute_tiny(api, TinySettings())     # real Wan/ChronoEdit models -> the tiny test models

``to_api`` does what the frontend does when you press Queue: widget values are matched to input names
in the order ``/object_info`` declares them (skipping the extra "control_after_generate" value after
seed-like INT widgets and the upload button value after LoadImage's combo), links become
``[node_id, output_slot]``, Reroutes are followed, PrimitiveNodes become literal values, Notes and
groups are dropped, muted nodes are left out and bypassed nodes pass their inputs through.

``substitute_tiny`` makes a workflow written for 14B models runnable on a CPU in seconds: diffusion
models become the tiny seeded Wan checkpoints of ``tools/make_tiny_models.py``, text encoding becomes
seeded stand-in conditioning, the image branch (LoadImage, CLIP vision, VAE, WanImageToVideo) becomes
stand-in image conditioning on a small empty latent, decoding and saving images becomes SaveLatent,
samplers run a few steps, and layer lists (written for 40 layers) become "all". The stand-in nodes are the test nodes in ``tests/comfy_test_nodes.py``,
so the server must have them installed (``tests/host.py``'s ComfyServer does).

    python tools/workflow_api.py WORKFLOW.json --server http://127.0.0.1:8188 [--tiny] > prompt.json
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

# Node types that exist only in the graph editor: never sent to the server.
FRONTEND_ONLY = frozenset({"Note", "MarkdownNote", "Reroute", "PrimitiveNode"})
# A combo whose chosen option brings further widgets (V3 io.DynamicCombo, e.g. SaveVideo's format on newer hosts).
DYNAMIC_COMBO = "COMFY_DYNAMICCOMBO_V3"
WIDGET_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO", DYNAMIC_COMBO})
# Values of the frontend's extra widgets that are saved in widgets_values but are no backend input.
CONTROL_AFTER_GENERATE = frozenset({"fixed", "increment", "decrement", "randomize"})
UPLOAD_WIDGETS = {"image_upload": "image", "video_upload": "video", "audio_upload": "audio"}
SEED_NAMES = frozenset({"seed", "noise_seed"})
MODE_MUTED, MODE_BYPASSED = 2, 4


class WorkflowError(ValueError):
    """A workflow that cannot be converted; the message names the node and what is wrong."""


# --------------------------------------------------------------------------------------------------
# Reading a UI workflow
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Link:
    id: int
    origin_id: int
    origin_slot: int
    target_id: int
    target_slot: int
    type: str


def load_workflow(path: str | Path) -> dict:
    with open(path, encoding="utf-8") as f:
        workflow = json.load(f)
    if not isinstance(workflow, dict) or "nodes" not in workflow:
        raise WorkflowError(f"{path}: not a UI-format workflow (no 'nodes'); API prompts need no conversion")
    return workflow


def links_of(workflow: dict) -> dict[int, Link]:
    """All links by id; reads both the array form (format 0.4) and the object form (format 1)."""
    out = {}
    for raw in workflow.get("links") or []:
        if isinstance(raw, dict):
            link = Link(raw["id"], raw["origin_id"], raw["origin_slot"], raw["target_id"], raw["target_slot"],
                        raw.get("type", "*"))
        else:
            link = Link(*raw[:6])
        out[link.id] = link
    return out


def input_name(slot: dict) -> str:
    """The backend input name of a node's input slot (a widget socket names its widget)."""
    widget = slot.get("widget")
    return widget["name"] if isinstance(widget, dict) and "name" in widget else slot["name"]


def spec_type(spec) -> str:
    """The type of an /object_info input spec: a list of options is a COMBO."""
    kind = spec[0]
    return "COMBO" if isinstance(kind, list) else str(kind)


def spec_options(spec) -> dict:
    return spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}


def _inputs_of(spec_dict: dict, order: dict | None = None) -> list[tuple[str, list, bool]]:
    """(name, spec, optional) of an input dict ``{"required": {...}, "optional": {...}}`` in order."""
    order = order or {}
    out = []
    for section in ("required", "optional"):
        specs = spec_dict.get(section, {}) or {}
        out += [(name, specs[name], section == "optional") for name in order.get(section, list(specs))]
    return out


def declared_inputs(node_info: dict) -> list[tuple[str, list]]:
    """(name, spec) of a node class's inputs in declaration order: required, then optional."""
    return [(name, spec) for name, spec, _ in _inputs_of(node_info.get("input", {}), node_info.get("input_order"))]


def is_widget(spec) -> bool:
    return spec_type(spec) in WIDGET_TYPES and not spec_options(spec).get("forceInput")


def _selected_option_inputs(name: str, spec, value) -> list[tuple[str, list, bool]]:
    """A dynamic combo's widgets for the chosen option, named ``<combo>.<input>`` as the server nests them."""
    for option in spec_options(spec).get("options", []):
        if option.get("key") == value:
            return [(f"{name}.{n}", s, o) for n, s, o in _inputs_of(option.get("inputs") or {})]
    return []


def widget_values(node: dict, node_info: dict) -> dict:
    """Map a node's ``widgets_values`` to its input names, as the frontend does when it queues.

    Works across hosts: a widget a newer host added after the saved ones takes its declared default (or,
    optional, is left out), and a dynamic combo's chosen option brings its own widgets next in line.
    """
    values = node.get("widgets_values")
    widgets = [w for w in _inputs_of(node_info.get("input", {}), node_info.get("input_order")) if is_widget(w[1])]
    if isinstance(values, dict):  # some nodes save widgets by name
        return {name: values[name] for name, _, _ in widgets if name in values}
    values = list(values or [])
    out, i = {}, 0
    while widgets:
        name, spec, optional = widgets.pop(0)
        if i >= len(values):
            if "default" in spec_options(spec):
                out[name] = spec_options(spec)["default"]
                continue
            if optional:
                continue
            raise WorkflowError(f"node {node['id']} ({node['type']}): no widget value for '{name}' "
                                f"(widgets_values has {len(values)}: {values!r})")
        out[name] = values[i]
        i += 1
        if spec_type(spec) == DYNAMIC_COMBO:
            widgets[:0] = [w for w in _selected_option_inputs(name, spec, out[name]) if is_widget(w[1])]
        options = spec_options(spec)
        control = options.get("control_after_generate")   # True, or (newer hosts) the default mode's name
        seed_like = spec_type(spec) == "INT" and (control is True or control in CONTROL_AFTER_GENERATE
                                                  or (control is None and name in SEED_NAMES))
        if seed_like and i < len(values) and values[i] in CONTROL_AFTER_GENERATE:
            i += 1
        for flag, button in UPLOAD_WIDGETS.items():
            if options.get(flag) and i < len(values) and values[i] == button:
                i += 1
    if i != len(values):
        raise WorkflowError(f"node {node['id']} ({node['type']}): {len(values) - i} widget value(s) left over "
                            f"after {[n for n, _ in widgets]}: {values[i:]!r}")
    return out


# --------------------------------------------------------------------------------------------------
# UI graph -> API prompt
# --------------------------------------------------------------------------------------------------

def to_api(workflow: dict, object_info: dict) -> dict:
    """The API prompt for a UI-format workflow: ``{node_id: {"class_type", "inputs", "_meta"}}``."""
    nodes = {node["id"]: node for node in workflow["nodes"]}
    links = links_of(workflow)
    subgraphs = {sub["id"] for sub in (workflow.get("definitions") or {}).get("subgraphs", [])}

    for node in nodes.values():
        if node["type"] in subgraphs:
            raise WorkflowError(f"node {node['id']} is a subgraph; unpack it in the editor first "
                                "(right click > Unpack Subgraph)")
        if node["type"] not in FRONTEND_ONLY and node["type"] not in object_info:
            raise WorkflowError(f"node {node['id']}: unknown node type {node['type']!r} (not in /object_info); "
                                "install the node pack that provides it")

    def source(link_id, seen=()):
        """Where a link's value comes from: ('node', id, slot), ('value', v) or None (nothing)."""
        if link_id is None or link_id in seen:
            return None
        link = links.get(link_id)
        if link is None:
            raise WorkflowError(f"link {link_id} is referenced by a node but missing from 'links'")
        origin = nodes.get(link.origin_id)
        if origin is None:
            raise WorkflowError(f"link {link_id} starts at node {link.origin_id}, which does not exist")
        mode = origin.get("mode", 0)
        if origin["type"] == "Reroute":
            return source((origin.get("inputs") or [{}])[0].get("link"), seen + (link_id,))
        if origin["type"] == "PrimitiveNode":
            return ("value", (origin.get("widgets_values") or [None])[0])
        if mode == MODE_MUTED:
            return None
        if mode == MODE_BYPASSED:
            return source(_bypass_input(origin, link), seen + (link_id,))
        return ("node", str(origin["id"]), link.origin_slot)

    api = {}
    for node in sorted(nodes.values(), key=lambda n: n["id"]):
        if node["type"] in FRONTEND_ONLY or node.get("mode", 0) in (MODE_MUTED, MODE_BYPASSED):
            continue
        info = object_info[node["type"]]
        inputs = widget_values(node, info)
        for slot in node.get("inputs") or []:
            name = input_name(slot)
            found = source(slot.get("link"))
            if found is None:
                continue  # unconnected: a widget keeps its value, an optional socket stays empty
            inputs[name] = found[1] if found[0] == "value" else [found[1], found[2]]
        api[str(node["id"])] = {"class_type": node["type"], "inputs": inputs,
                                "_meta": {"title": node.get("title") or info.get("display_name") or node["type"]}}
    return api


def _bypass_input(node: dict, link: Link):
    """The input link a bypassed node passes through to ``link``: the first input of the same type."""
    candidates = [slot for slot in node.get("inputs") or [] if slot.get("link") is not None]
    for slot in candidates:
        if slot.get("type") == link.type:
            return slot["link"]
    return None


# --------------------------------------------------------------------------------------------------
# Tiny-model substitution (API prompt -> API prompt)
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TinySettings:
    """What ``substitute_tiny`` puts in place of the real models and sizes."""

    width: int = 64
    height: int = 64
    length: int = 5                 # video frames; 5 -> 2 latent frames
    steps: int = 2
    text_tokens: int = 8
    layers: str = "all"             # layer lists of 40-layer models mean nothing for the 2-layer tiny ones
    receiver_t2v: str = "tiny_wan_t2v_a.safetensors"   # the first Wan T2V model of the graph
    second_t2v: str = "tiny_wan_t2v_b.safetensors"     # any further Wan T2V model
    i2v: str = "tiny_wan_i2v.safetensors"               # ChronoEdit and Wan I2V models
    save_prefix: str = "dit_cache_bridge_tiny"


# Nodes whose only job is to feed what the substitution replaces; they go once nothing reads them.
FEEDERS = frozenset({"CLIPLoader", "DualCLIPLoader", "LoadImage", "CLIPVisionLoader", "CLIPVisionEncode", "VAELoader",
                     "ImageScaleToMaxDimension", "ImageScale", "ImageScaleBy"})
DECODERS = frozenset({"VAEDecode", "VAEDecodeTiled"})
SAMPLERS_WITH_STEPS = frozenset({"KSampler", "DiTCacheBridge_BridgedKSampler", "DiTCacheBridge_RecordKVCache"})
LAYERED_SOURCES = frozenset({"DiTCacheBridge_CaptureKVCache", "DiTCacheBridge_RecordKVCache"})
LATENT_SOURCES = frozenset({"EmptyHunyuanLatentVideo"})


def stable_seed(text) -> int:
    """A seed that depends only on ``text`` (same prompt text -> same stand-in conditioning)."""
    return zlib.crc32(str(text).encode("utf-8")) % (2 ** 31)


def is_link(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


def tiny_model_for(file_name: str, t2v_seen: list[str], settings: TinySettings) -> str:
    """The tiny model standing in for a diffusion model file: I2V-type (ChronoEdit, Wan I2V) or T2V."""
    lower = file_name.lower()
    if "i2v" in lower or "chrono" in lower or "flf2v" in lower:
        return settings.i2v
    if file_name not in t2v_seen:
        t2v_seen.append(file_name)
    return settings.receiver_t2v if t2v_seen.index(file_name) == 0 else settings.second_t2v


def substitute_tiny(api: dict, settings: TinySettings = TinySettings(), object_info: dict | None = None) -> dict:
    """A copy of ``api`` that runs on the tiny models in seconds; see the module docstring for the swaps.

    With ``object_info``, nodes that no output node depends on are dropped too (as the server would
    skip them anyway); without it only the replaced branches are removed.
    """
    api = copy.deepcopy(api)
    redirect: dict[tuple[str, int], list] = {}   # (node, slot) -> new [node, slot]
    dropped_outputs: set[str] = set()              # nodes whose outputs are gone (decoders, removed nodes)
    t2v_seen: list[str] = []

    for node_id in sorted(api, key=_id_order):
        node = api[node_id]
        kind, inputs = node["class_type"], node["inputs"]
        if kind == "UNETLoader":
            inputs["unet_name"] = tiny_model_for(inputs["unet_name"], t2v_seen, settings)
            inputs["weight_dtype"] = "default"
        elif kind == "CLIPTextEncode":
            api[node_id] = {"class_type": "DCBTestWanConditioning", "_meta": node.get("_meta", {}),
                            "inputs": {"seed": stable_seed(inputs.get("text", node_id)),
                                       "length": settings.text_tokens, "batch_size": 1}}
        elif kind == "WanImageToVideo":
            _replace_image_to_video(api, node_id, settings, redirect)
        elif kind in LATENT_SOURCES:
            inputs.update(width=settings.width, height=settings.height, length=settings.length)
        elif kind in DECODERS:
            api[node_id] = {"class_type": "SaveLatent", "_meta": node.get("_meta", {}),
                            "inputs": {"samples": inputs["samples"],
                                       "filename_prefix": f"{settings.save_prefix}/{node_id}"}}
            dropped_outputs.add(node_id)
        elif kind == "DiTCacheBridge_CreateC2CProjector" or (kind in LAYERED_SOURCES and inputs.get("layers") != "auto"):
            inputs["layers"] = settings.layers
        if kind in SAMPLERS_WITH_STEPS and "steps" in inputs:
            api[node_id]["inputs"]["steps"] = settings.steps     # a literal, also where a primitive fed it
        if kind in ("DiTCacheBridge_FuseCaches", "DiTCacheBridge_BridgedKSampler") and inputs.get("layer_strengths"):
            inputs["layer_strengths"] = ""

    for node in api.values():
        for name, value in node["inputs"].items():
            if is_link(value) and (value[0], value[1]) in redirect:
                node["inputs"][name] = list(redirect[(value[0], value[1])])

    # Whatever read a decoded image (SaveImage, CreateVideo, ImageFromBatch ...) goes, transitively.
    changed = True
    while changed:
        changed = False
        for node_id in list(api):
            if any(is_link(v) and v[0] in dropped_outputs for v in api[node_id]["inputs"].values()):
                del api[node_id]
                dropped_outputs.add(node_id)
                changed = True

    _drop_unread_feeders(api)
    if object_info is not None:
        api = keep_needed(api, object_info)
    missing = sorted({v[0] for n in api.values() for v in n["inputs"].values() if is_link(v) and v[0] not in api})
    if missing:
        raise WorkflowError(f"after substitution, inputs still read removed nodes {missing}")
    return api


def _replace_image_to_video(api: dict, node_id: str, settings: TinySettings, redirect: dict) -> None:
    """WanImageToVideo -> stand-in image conditioning for positive and negative + a small empty latent."""
    node = api.pop(node_id)
    inputs, meta = node["inputs"], node.get("_meta", {})
    latent_id, positive_id, negative_id = f"{node_id}_latent", f"{node_id}_positive", f"{node_id}_negative"
    api[latent_id] = {"class_type": "EmptyHunyuanLatentVideo", "_meta": meta,
                      "inputs": {"width": settings.width, "height": settings.height, "length": settings.length,
                                 "batch_size": inputs.get("batch_size", 1)}}
    clip_seed = stable_seed(inputs["clip_vision_output"]) if "clip_vision_output" in inputs else -1
    for new_id, which in ((positive_id, "positive"), (negative_id, "negative")):
        api[new_id] = {"class_type": "DCBTestWanImageConditioning", "_meta": meta,
                       "inputs": {"conditioning": inputs[which], "start_latent": [latent_id, 0],
                                  "clip_seed": clip_seed, "known_frames": 1}}
    redirect.update({(node_id, 0): [positive_id, 0], (node_id, 1): [negative_id, 0], (node_id, 2): [latent_id, 0]})


def _drop_unread_feeders(api: dict) -> None:
    while True:
        read = {v[0] for n in api.values() for v in n["inputs"].values() if is_link(v)}
        unread = [i for i, n in api.items() if n["class_type"] in FEEDERS and i not in read]
        if not unread:
            return
        for node_id in unread:
            del api[node_id]


def keep_needed(api: dict, object_info: dict, outputs=None) -> dict:
    """Only the output nodes (or the given ones) and what they depend on: what the server would execute."""
    if outputs is None:
        outputs = [i for i, n in api.items() if object_info.get(n["class_type"], {}).get("output_node")]
    needed, todo = set(), list(outputs)
    while todo:
        node_id = todo.pop()
        if node_id in needed or node_id not in api:
            continue
        needed.add(node_id)
        todo.extend(v[0] for v in api[node_id]["inputs"].values() if is_link(v))
    return {i: n for i, n in api.items() if i in needed}


def depends_on(api: dict, node_id: str, ancestor: str) -> bool:
    """Whether ``node_id`` reads ``ancestor``'s output, directly or through other nodes."""
    seen, todo = set(), [node_id]
    while todo:
        current = todo.pop()
        if current == ancestor:
            return True
        if current in seen or current not in api:
            continue
        seen.add(current)
        todo.extend(v[0] for v in api[current]["inputs"].values() if is_link(v))
    return False


def nodes_of_type(api: dict, class_type: str) -> list[str]:
    return sorted((i for i, n in api.items() if n["class_type"] == class_type), key=_id_order)


def _id_order(node_id: str):
    return (0, int(node_id), "") if node_id.isdigit() else (1, 0, node_id)


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------

def fetch_object_info(server: str) -> dict:
    import urllib.request

    with urllib.request.urlopen(f"{server.rstrip('/')}/object_info", timeout=60) as response:
        return json.load(response)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workflow", help="a UI-format workflow JSON")
    parser.add_argument("--server", default="http://127.0.0.1:8188", help="a running ComfyUI (for /object_info)")
    parser.add_argument("--object-info", help="read /object_info from this JSON file instead of the server")
    parser.add_argument("--tiny", action="store_true", help="substitute the tiny test models")
    args = parser.parse_args(argv)
    if args.object_info:
        object_info = json.loads(Path(args.object_info).read_text(encoding="utf-8"))
    else:
        object_info = fetch_object_info(args.server)
    api = to_api(load_workflow(args.workflow), object_info)
    if args.tiny:
        api = substitute_tiny(api, object_info=object_info)
    json.dump(api, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
