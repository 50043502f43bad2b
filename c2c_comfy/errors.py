"""One error type for everything a user can get wrong in the graph.

ComfyUI shows the exception message in its error dialog, so the message is the interface:
which node, which input, what was found, what was expected and what to do.
"""
from __future__ import annotations


#: what a message quotes of a user's or a file's text (a 5 MB string must not reach the UI and /history)
MAX_FOUND = 1500


class BridgeInputError(ValueError):
    def __init__(self, node: str, input_name: str, found: str, expected: str, fix: str):
        self.node, self.input_name = node, input_name
        found = found if len(found) <= MAX_FOUND else f"{found[:MAX_FOUND]}… ({len(found)} characters)"
        super().__init__(f"{node} › {input_name}: {found}; expected {expected}. Fix: {fix}")


# ComfyUI names an error by module + class, and loads this pack under its folder's path: without this, the
# error panel (frontend 1.49) leads with ".../custom_nodes/dit_cache_bridge.c2c_comfy.errors.BridgeInputError".
BridgeInputError.__module__ = "DiTCacheBridge"


def check(condition: bool, node: str, input_name: str, found: str, expected: str, fix: str) -> None:
    if not condition:
        raise BridgeInputError(node, input_name, found, expected, fix)
