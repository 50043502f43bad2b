"""Checks ComfyUI leaves to the node: V3 combo values in API prompts and numbers arriving through links.

ComfyUI 0.3.75 validates a V3 node's combo values only for widgets in the UI; an API prompt (or a
shared workflow edited by hand) can send ``'banana'``. A node calls :func:`check_combos` first thing
in ``execute`` so the error names the node and the input, not a KeyError three calls later.
"""
from __future__ import annotations

import math

from comfy_api.latest import io

from ..c2c_core.errors import quote
from .errors import BridgeInputError


def check_combos(node_cls, values: dict) -> None:
    """Every combo input of ``node_cls``'s schema that appears in ``values`` holds one of its options."""
    for spec in node_cls.define_schema().inputs:
        if not isinstance(spec, io.Combo.Input) or spec.id not in values:
            continue
        value = values[spec.id]
        if value is None and spec.optional:
            continue
        options = list(spec.options or [])
        if not isinstance(value, str) or value not in options:
            shown = options if len(options) <= 12 else options[:12] + ["…"]
            raise BridgeInputError(node_cls.NODE, spec.id, quote(value, 60), f"one of {shown}",
                                   "pick a value from the list (the prompt was probably edited by hand or made by "
                                   "another version)")


def check_number(node: str, input_name: str, value, lo: float, hi: float, integer: bool = False, hint: str = "") -> None:
    """A finite number in [lo, hi] (an int when ``integer``), whatever a link delivered."""
    kinds = (int,) if integer else (int, float)
    ok = type(value) in kinds and (integer or math.isfinite(value)) and lo <= value <= hi
    if not ok:
        what = "an integer" if integer else "a finite number"
        raise BridgeInputError(node, input_name, quote(value, 40), f"{what} from {lo:g} to {hi:g}",
                               hint or "set it within that range")
