"""The shared test harness: a real ComfyUI, in-process or as a headless server, plus tiny models.

In-process::

    host = setup_comfy_in_process(models_root, tmp_dir)   # once per process (the ``comfy`` fixture)
    import comfy.sd, nodes                                # ComfyUI's modules, never this repo's
    pack = load_pack()                                    # this repo as the package ``dit_cache_bridge``

As a server (what a user's ComfyUI does with the pack installed in custom_nodes)::

    with ComfyServer(tmp_dir, models_root) as server:
        prompt_id = server.post_prompt(api_graph)
        entry = server.wait(prompt_id, timeout=120)

Conditioning without a text encoder: ``wan_conditioning`` and ``i2v_conditioning`` (in-process) and
the test nodes ``DCBTestWanConditioning`` / ``DCBTestWanImageConditioning`` (in the server), all
from ``comfy_test_nodes.py``.

Name clash to keep in mind: this repo has a package ``nodes/`` and ComfyUI has a module
``nodes.py``. ComfyUI's folder must come first on sys.path, and the pack's own code only ever
imports its ``nodes`` relatively (``from .nodes import …``).
"""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# One module, whether imported as ``host`` (tests/ is on sys.path) or as ``tests.host``: the in-process
# setup below is process-wide state and must not exist twice.
for _alias in ("host", "tests.host"):
    sys.modules.setdefault(_alias, sys.modules[__name__])
# The test nodes module sits beside this file; make it importable when a script (the demo) imports us.
if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.append(str(Path(__file__).resolve().parent))

from comfy_test_nodes import (  # noqa: E402,F401  (re-exported for the tests)
    clip_vision_features,
    i2v_conditioning,
    wan_conditioning,
    wan_text_context,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
TOOLS_DIR = REPO_ROOT / "tools"
PACK_NAME = "dit_cache_bridge"
TEST_NODES_FILE = Path(__file__).resolve().with_name("comfy_test_nodes.py")
# Folders the yaml names under the models root (add more here when the pack grows a folder).
MODEL_FOLDERS = ("diffusion_models", "checkpoints", "vae", "text_encoders", "clip_vision", "loras", "c2c_projectors")

# File names of the tiny models, as UNETLoader's ``unet_name`` takes them.
T2V_A = "tiny_wan_t2v_a.safetensors"
T2V_B = "tiny_wan_t2v_b.safetensors"
I2V = "tiny_wan_i2v.safetensors"
T2V_WIDE = "tiny_wan_t2v_wide.safetensors"
TI2V = "tiny_wan22_ti2v.safetensors"    # Wan2.2-TI2V-5B layout: 48-channel latent
TINY_MODEL_FILES = (T2V_A, T2V_B, I2V, T2V_WIDE, TI2V)


def _load_tool(name: str):
    """Import tools/<name>.py under a private module name (tools/ is not a package)."""
    module_name = f"_dcb_tools_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, TOOLS_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


install_host = _load_tool("install_host")
make_tiny_models = _load_tool("make_tiny_models")
HostNotInstalled = install_host.HostNotInstalled


def comfyui_path() -> Path:
    """The ComfyUI tree under test: ``COMFYUI_PATH`` if set, else ``.host/ComfyUI`` (``make host``).

    Raises HostNotInstalled when there is neither.
    """
    return install_host.comfyui_path()


def require_comfyui() -> Path:
    """comfyui_path(), or skip the calling test when no host is installed (fail under CI=true).

    A COMFYUI_PATH that is set but is no ComfyUI tree always fails: that is a broken setup, not a
    missing optional dependency.
    """
    import pytest

    try:
        return comfyui_path()
    except HostNotInstalled as exc:
        if os.environ.get("COMFYUI_PATH") or os.environ.get("CI"):
            pytest.fail(f"ComfyUI host required: {exc}", pytrace=False)
        pytest.skip(f"no ComfyUI host: {exc}")


# --------------------------------------------------------------------------------------------------
# Tiny models
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TinyModels:
    """A ComfyUI models root holding the tiny Wan checkpoints in ``diffusion_models/``."""

    root: Path

    @property
    def diffusion_models(self) -> Path:
        return self.root / make_tiny_models.SUBFOLDER

    def path(self, name: str) -> Path:
        """Absolute path of a tiny model by file or model name: ``path(T2V_A)``, ``path("tiny_wan_t2v_a")``."""
        file_name = name if name.endswith(".safetensors") else make_tiny_models.file_name(name)
        if file_name.removesuffix(".safetensors") not in make_tiny_models.TINY_MODELS:
            raise KeyError(f"no tiny model {name!r}; known: {sorted(make_tiny_models.TINY_MODELS)}")
        return self.diffusion_models / file_name

    __getitem__ = path  # tiny_models["tiny_wan_t2v_a"] -> Path

    @staticmethod
    def spec(file_name: str) -> dict:
        """The maker's spec of a tiny model: model_type, dim, ffn_dim, num_layers, in_dim, seed, num_heads."""
        name = file_name.removesuffix(".safetensors")
        spec = dict(make_tiny_models.TINY_MODELS[name])
        spec["num_heads"] = spec["dim"] // make_tiny_models.HEAD_DIM
        return spec


def ensure_tiny_models(root: Path | None = None, timeout: float = 300) -> TinyModels:
    """Run the maker (a subprocess, so this process stays free of ComfyUI imports); fast when up to date."""
    root = Path(root) if root is not None else make_tiny_models.DEFAULT_OUT
    result = subprocess.run(
        [sys.executable, str(TOOLS_DIR / "make_tiny_models.py"), "--out", str(root)],
        capture_output=True, text=True, timeout=timeout,
    )
    if result.returncode != 0:
        raise RuntimeError(f"make_tiny_models.py failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return TinyModels(root.resolve())


def write_extra_model_paths(yaml_path: Path, models_root: Path, custom_nodes: Path | None = None) -> Path:
    """An extra_model_paths yaml naming ``models_root`` as a models root (and a custom_nodes folder)."""
    lines = ["dit_cache_bridge_tests:", f"    base_path: {Path(models_root).resolve()}"]
    lines += [f"    {folder}: {folder}" for folder in MODEL_FOLDERS]
    if custom_nodes is not None:
        lines.append(f"    custom_nodes: {Path(custom_nodes).resolve()}")
    yaml_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return yaml_path


def edited_copy(tree: Path, dest: Path, edits: dict) -> Path:
    """A copy of a ComfyUI tree made of symlinks, except ``main.py`` and the files in ``edits``
    (``{"comfy/x.py": text -> text}``), which are rewritten, and the folders above them.

    ``main.py`` is a real file so that the server's sys.path starts at the copy (Python resolves a
    symlinked script to its target's folder); ``__pycache__`` folders are not linked, so compiled
    edited files never land in the original tree.
    """
    edits = {"main.py": lambda text: text, **edits}
    dest.mkdir(parents=True)

    def fill(src: Path, dst: Path, rel: tuple) -> None:
        below = {Path(r).parts[len(rel)] for r in edits if Path(r).parts[:len(rel)] == rel}
        for child in src.iterdir():
            if child.name == "__pycache__":
                continue
            if child.name not in below:
                (dst / child.name).symlink_to(child, target_is_directory=child.is_dir())
            elif child.is_dir():
                (dst / child.name).mkdir()
                fill(child, dst / child.name, rel + (child.name,))
            else:
                edit = edits["/".join(rel + (child.name,))]
                (dst / child.name).write_text(edit(child.read_text(encoding="utf-8")), encoding="utf-8")

    fill(Path(tree), Path(dest), ())
    return Path(dest)


# --------------------------------------------------------------------------------------------------
# In-process ComfyUI
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ComfyHost:
    """What setup_comfy_in_process configured."""

    path: Path
    models_root: Path
    input_dir: Path
    output_dir: Path
    temp_dir: Path
    user_dir: Path


_in_process: ComfyHost | None = None


def _prepend_comfyui(path: Path) -> None:
    """ComfyUI's tree, then its site folder (packages it pins at other versions), ahead of everything."""
    entries = install_host.host_paths(path)
    for entry in entries:
        while entry in sys.path:
            sys.path.remove(entry)
    sys.path[:0] = entries
    loaded = sys.modules.get("nodes")
    if loaded is not None and Path(getattr(loaded, "__file__", "") or "").resolve() != path / "nodes.py":
        raise RuntimeError(
            f"'nodes' is already imported from {getattr(loaded, '__file__', loaded)!r}, not ComfyUI's "
            f"{path / 'nodes.py'}: something imported this repo's nodes/ package as a top-level module. "
            "Import the pack through host.load_pack() (package 'dit_cache_bridge') instead."
        )


def setup_comfy_in_process(models_root: Path, tmp_dir: Path) -> ComfyHost:
    """Make ComfyUI importable and configured for CPU in this process; idempotent.

    ComfyUI goes to sys.path[0] (ahead of the repo root, whose ``nodes/`` package would shadow
    ComfyUI's ``nodes.py``), ``args.cpu`` and ``args.deterministic`` are set before
    comfy.model_management is first imported, the models root is registered through the same yaml
    loader the server uses, and input/output/temp/user folders are made under ``tmp_dir``.
    """
    global _in_process
    if _in_process is not None:
        return _in_process
    path = comfyui_path()
    _prepend_comfyui(path)

    import comfy.cli_args

    if "comfy.model_management" in sys.modules and not comfy.cli_args.args.cpu:
        raise RuntimeError("comfy.model_management was imported before setup_comfy_in_process set args.cpu")
    comfy.cli_args.args.cpu = True
    comfy.cli_args.args.deterministic = True

    import comfy.model_management  # noqa: F401  (reads args now)
    import folder_paths
    import utils.extra_config  # before nodes: nodes.py puts ComfyUI/comfy (with its utils.py) at sys.path[0]
    import nodes

    if Path(nodes.__file__).resolve() != path / "nodes.py":
        raise RuntimeError(f"'import nodes' gave {nodes.__file__}, expected ComfyUI's {path / 'nodes.py'}")

    tmp_dir = Path(tmp_dir)
    dirs = {name: tmp_dir / name for name in ("input", "output", "temp", "user")}
    for folder in dirs.values():
        folder.mkdir(parents=True, exist_ok=True)
    folder_paths.set_input_directory(str(dirs["input"]))
    folder_paths.set_output_directory(str(dirs["output"]))
    folder_paths.set_temp_directory(str(dirs["temp"]))
    folder_paths.set_user_directory(str(dirs["user"]))
    utils.extra_config.load_extra_path_config(str(write_extra_model_paths(tmp_dir / "extra_model_paths.yaml", models_root)))

    _in_process = ComfyHost(path, Path(models_root).resolve(), dirs["input"], dirs["output"], dirs["temp"], dirs["user"])
    return _in_process


def core_node(module: str, name: str):
    """A ComfyUI node class from ``comfy_extras`` (or ``nodes``), or skip the test on a host that lacks it."""
    import importlib

    import pytest

    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        pytest.skip(f"this ComfyUI has no {module}.{name}")


def run_node(cls, *args) -> tuple:
    """A node's outputs as a tuple, whether the host made it a V3 node (``execute``) or a V1 node (``FUNCTION``)."""
    if hasattr(cls, "define_schema"):
        return tuple(cls.execute(*args).args)
    return tuple(getattr(cls(), cls.FUNCTION)(*args))


def load_builtin_extra_nodes() -> None:
    """Register comfy_extras' nodes (ModelSamplingSD3, EmptyHunyuanLatentVideo …) in nodes.NODE_CLASS_MAPPINGS."""
    import asyncio

    import nodes

    if "ModelSamplingSD3" not in nodes.NODE_CLASS_MAPPINGS:
        asyncio.run(nodes.init_builtin_extra_nodes())


def load_pack():
    """Import this repository as the package ``dit_cache_bridge`` (as ComfyUI would load it).

    Needs setup_comfy_in_process first, since the pack imports ComfyUI modules.
    """
    if PACK_NAME in sys.modules:
        return sys.modules[PACK_NAME]
    if _in_process is None:
        raise RuntimeError("call setup_comfy_in_process() (the 'comfy' fixture) before load_pack()")
    spec = importlib.util.spec_from_file_location(
        PACK_NAME, REPO_ROOT / "__init__.py", submodule_search_locations=[str(REPO_ROOT)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK_NAME] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[PACK_NAME]
        raise
    return module


# --------------------------------------------------------------------------------------------------
# ComfyUI as a headless server
# --------------------------------------------------------------------------------------------------

class PromptRejected(RuntimeError):
    """POST /prompt answered 400: the graph did not validate. ``.error`` and ``.node_errors`` as sent."""

    def __init__(self, body: dict):
        self.error = body.get("error")
        self.node_errors = body.get("node_errors", {})
        super().__init__(f"prompt rejected: {self.error}; node_errors: {self.node_errors}")


class PromptFailed(RuntimeError):
    """The prompt ran and ended with an error (or an interrupt). ``.entry`` is its history entry."""

    def __init__(self, prompt_id: str, entry: dict, log_tail: str):
        self.entry = entry
        messages = entry.get("status", {}).get("messages", [])
        details = [m[1] for m in messages if m and m[0] in ("execution_error", "execution_interrupted")]
        super().__init__(f"prompt {prompt_id} failed: {details}\n--- server log tail ---\n{log_tail}")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ComfyServer:
    """A ComfyUI server in a subprocess with its own folders, the tiny models and this pack installed.

    ``base_dir`` receives input/, output/, temp/, user/, custom_nodes/, the yaml, the sqlite
    database and ``server.log``. custom_nodes/ holds a symlink ``dit_cache_bridge -> repo root``
    and the test nodes. The server is always stopped on exit from the ``with`` block, errors included.
    """

    def __init__(self, base_dir: Path, models_root: Path, *, comfyui: Path | None = None,
                 startup_timeout: float = 90.0, extra_args: tuple[str, ...] = (),
                 install_pack: bool = True, install_test_nodes: bool = True):
        self.base_dir = Path(base_dir).resolve()
        self.models_root = Path(models_root).resolve()
        self.comfyui = Path(comfyui) if comfyui is not None else comfyui_path()
        self.startup_timeout = startup_timeout
        self.extra_args = tuple(extra_args)
        self.install_pack = install_pack
        self.install_test_nodes = install_test_nodes
        self.input_dir = self.base_dir / "input"
        self.output_dir = self.base_dir / "output"
        self.temp_dir = self.base_dir / "temp"
        self.user_dir = self.base_dir / "user"
        self.custom_nodes_dir = self.base_dir / "custom_nodes"
        self.log_path = self.base_dir / "server.log"
        self.port: int | None = None
        self.url: str | None = None
        self.startup_seconds: float | None = None
        self._process: subprocess.Popen | None = None
        self._log_file = None

    # lifecycle ------------------------------------------------------------------------------------

    def __enter__(self) -> "ComfyServer":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def _prepare_folders(self) -> Path:
        for folder in (self.input_dir, self.output_dir, self.temp_dir, self.user_dir, self.custom_nodes_dir):
            folder.mkdir(parents=True, exist_ok=True)
        links = {}
        if self.install_pack:
            links[PACK_NAME] = REPO_ROOT
        if self.install_test_nodes:
            links["dit_cache_bridge_test_nodes.py"] = TEST_NODES_FILE
        for name, target in links.items():
            link = self.custom_nodes_dir / name
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(target, target_is_directory=target.is_dir())
        return write_extra_model_paths(self.base_dir / "extra_model_paths.yaml", self.models_root, self.custom_nodes_dir)

    def _command(self, yaml_path: Path) -> list[str]:
        return [
            sys.executable, "main.py", "--cpu", "--deterministic",
            "--listen", "127.0.0.1", "--port", str(self.port), "--disable-auto-launch",
            "--extra-model-paths-config", str(yaml_path),
            "--output-directory", str(self.output_dir), "--input-directory", str(self.input_dir),
            "--temp-directory", str(self.temp_dir), "--user-directory", str(self.user_dir),
            "--database-url", f"sqlite:///{self.base_dir / 'db.sqlite'}",
            *self.extra_args,
        ]

    def start(self) -> None:
        yaml_path = self._prepare_folders()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        # The server's sys.path starts with ComfyUI's folder, never this repo; then the host's site folder.
        env.pop("PYTHONPATH", None)
        site = install_host.host_paths(self.comfyui)[1:]
        if site:
            env["PYTHONPATH"] = os.pathsep.join(site)
        for attempt in range(3):
            self.port = free_port()
            self.url = f"http://127.0.0.1:{self.port}"
            self._log_file = self.log_path.open("ab")
            self._log_file.write(f"\n=== start attempt {attempt + 1}: port {self.port} ===\n".encode())
            self._log_file.flush()
            started = time.monotonic()
            self._process = subprocess.Popen(
                self._command(yaml_path), cwd=self.comfyui, env=env, stdin=subprocess.DEVNULL,
                stdout=self._log_file, stderr=subprocess.STDOUT, start_new_session=True,
            )
            if self._wait_ready(started):
                self.startup_seconds = time.monotonic() - started
                return
            # The process exited: retry only when another process took the port in between.
            self.stop()
            if "address already in use" not in self.log_text().lower():
                break
        raise RuntimeError(f"ComfyUI server did not start (see {self.log_path}):\n{self.log_tail()}")

    def _wait_ready(self, started: float) -> bool:
        import requests

        while time.monotonic() - started < self.startup_timeout:
            if self._process.poll() is not None:
                return False
            try:
                if requests.get(f"{self.url}/object_info/KSampler", timeout=5).status_code == 200:
                    return True
            except requests.RequestException:
                pass
            time.sleep(0.25)
        self.stop()
        raise TimeoutError(f"ComfyUI server not ready after {self.startup_timeout:.0f} s (see {self.log_path}):\n"
                           f"{self.log_tail()}")

    def stop(self) -> None:
        """Terminate the server's process group, then kill it if it has not exited after 10 s."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            try:
                os.killpg(process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                process.wait(timeout=10)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    # logs -----------------------------------------------------------------------------------------

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    # API ------------------------------------------------------------------------------------------

    def _check_alive(self) -> None:
        if not self.running:
            raise RuntimeError(f"ComfyUI server is not running (see {self.log_path}):\n{self.log_tail()}")

    def object_info(self, cls: str | None = None) -> dict:
        """GET /object_info: all node classes, or (with ``cls``) that class's own entry (KeyError if unknown)."""
        import requests

        self._check_alive()
        url = f"{self.url}/object_info" + (f"/{cls}" if cls else "")
        response = requests.get(url, timeout=60)
        response.raise_for_status()
        info = response.json()
        return info[cls] if cls else info

    def post_prompt(self, api_graph: dict, client_id: str = "dit-cache-bridge-tests") -> str:
        """POST /prompt; returns the prompt_id, raises PromptRejected (with node_errors) on 400."""
        import requests

        self._check_alive()
        response = requests.post(f"{self.url}/prompt", json={"prompt": api_graph, "client_id": client_id}, timeout=60)
        if response.status_code == 400:
            raise PromptRejected(response.json())
        response.raise_for_status()
        return response.json()["prompt_id"]

    def history(self, prompt_id: str) -> dict | None:
        import requests

        response = requests.get(f"{self.url}/history/{prompt_id}", timeout=30)
        response.raise_for_status()
        return response.json().get(prompt_id)

    def wait(self, prompt_id: str, timeout: float = 120.0, check: bool = True) -> dict:
        """Poll GET /history until the prompt finished; returns its history entry.

        With ``check`` a prompt that ended in an error or an interrupt raises PromptFailed; without,
        the entry is returned whatever its ``status.status_str`` ('success' or 'error').
        """
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive()
            entry = self.history(prompt_id)
            status = (entry or {}).get("status", {})
            if entry is not None and (status.get("completed") or status.get("status_str") in ("success", "error")):
                if check and status.get("status_str") != "success":
                    raise PromptFailed(prompt_id, entry, self.log_tail())
                return entry
            if time.monotonic() > deadline:
                raise TimeoutError(f"prompt {prompt_id} not finished after {timeout:.0f} s:\n{self.log_tail()}")
            time.sleep(0.1)

    def run(self, api_graph: dict, timeout: float = 120.0) -> dict:
        """post_prompt then wait; returns the history entry of a successful run."""
        return self.wait(self.post_prompt(api_graph), timeout=timeout)

    def interrupt(self) -> None:
        """POST /interrupt: stops the prompt that is executing now."""
        import requests

        self._check_alive()
        requests.post(f"{self.url}/interrupt", timeout=30).raise_for_status()

    def output_files(self, entry: dict, node_id: str, kind: str = "latents") -> list[Path]:
        """Paths of the files an output node reported in a history entry (``kind``: 'latents', 'images' …)."""
        outputs = entry.get("outputs", {}).get(str(node_id), {}).get(kind, [])
        root = {"output": self.output_dir, "temp": self.temp_dir, "input": self.input_dir}
        return [root[item.get("type", "output")] / item.get("subfolder", "") / item["filename"] for item in outputs]

