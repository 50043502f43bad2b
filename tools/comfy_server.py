"""ComfyUI as a headless server in a subprocess, with this pack installed: what a user's ComfyUI does.

    with ComfyServer(base_dir, models_root) as server:
        prompt_id = server.post_prompt(api_graph)
        entry = server.wait(prompt_id, timeout=120)

The server gets its own folders under ``base_dir``, the models root through an extra_model_paths yaml,
and a custom_nodes folder that links this repository as ``dit_cache_bridge`` (plus any ``custom_nodes``
files passed in, such as the stand-in conditioning nodes the tests and the demo use). Its sys.path
starts at ComfyUI's tree, never at this repository. The demo and the tests both start servers here.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Mapping

import install_host
from comfy_host import PACK_NAME, REPO_ROOT, write_extra_model_paths


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
    (unless ``install_pack`` is False) and one per ``custom_nodes`` entry (link name -> file or folder).
    The server is always stopped on exit from the ``with`` block, errors included.
    """

    def __init__(self, base_dir: Path, models_root: Path, *, comfyui: Path | None = None,
                 startup_timeout: float = 90.0, extra_args: tuple[str, ...] = (),
                 install_pack: bool = True, custom_nodes: Mapping[str, Path] | None = None):
        self.base_dir = Path(base_dir).resolve()
        self.models_root = Path(models_root).resolve()
        self.comfyui = Path(comfyui) if comfyui is not None else install_host.comfyui_path()
        self.startup_timeout = startup_timeout
        self.extra_args = tuple(extra_args)
        self.install_pack = install_pack
        self.custom_nodes = dict(custom_nodes or {})
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
        links = {PACK_NAME: REPO_ROOT} if self.install_pack else {}
        links.update(self.custom_nodes)
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

