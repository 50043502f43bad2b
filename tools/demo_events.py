"""The server's websocket while the demo's prompts run: when each one ends, and the fusion reports it sent."""
from __future__ import annotations

import json
import time
import uuid

from comfy_server import ComfyServer
from demo_graph import DemoError

#: the event a bridged run sends when it ends (the fusion inspector's report)
REPORT_EVENT = "dit_cache_bridge.report"


class ServerEvents:
    """The server's websocket for one client id: waits for a prompt to end, collecting our reports."""

    def __init__(self, server: ComfyServer):
        import websocket

        self.server = server
        self.client_id = f"dit-cache-bridge-demo-{uuid.uuid4().hex[:8]}"
        url = server.url.replace("http://", "ws://") + f"/ws?clientId={self.client_id}"
        self.ws = websocket.create_connection(url, timeout=30)
        self._timeout_error = websocket.WebSocketTimeoutException

    def close(self) -> None:
        self.ws.close()

    def run(self, prompt: dict, timeout: float) -> tuple[dict, list, float]:
        """Queue ``prompt``; returns (history entry, reports received, wall seconds)."""
        started = time.monotonic()
        prompt_id = self.server.post_prompt(prompt, client_id=self.client_id)
        reports, deadline = [], started + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DemoError(f"prompt {prompt_id} still running after {timeout:.0f} s; server log: "
                                f"{self.server.log_path}")
            self.ws.settimeout(min(remaining, 5.0))
            try:
                message = self.ws.recv()
            except self._timeout_error:
                if not self.server.running:
                    raise DemoError(f"the ComfyUI server stopped; see {self.server.log_path}:\n"
                                    f"{self.server.log_tail()}") from None
                continue
            if isinstance(message, bytes):       # preview images
                continue
            event = json.loads(message)
            kind, data = event.get("type"), event.get("data") or {}
            if kind == REPORT_EVENT:
                reports.append(data)
            elif data.get("prompt_id") == prompt_id and (
                    kind in ("execution_success", "execution_error", "execution_interrupted")
                    or (kind == "executing" and data.get("node") is None)):
                break
        seconds = time.monotonic() - started
        return self.server.wait(prompt_id, timeout=60), reports, seconds
