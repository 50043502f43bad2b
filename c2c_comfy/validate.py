"""Checks ComfyUI leaves to the node: V3 combo values in API prompts and numbers arriving through links.

ComfyUI 0.3.75 validates a V3 node's combo values only for widgets in the UI; an API prompt (or a
shared workflow edited by hand) can send ``'banana'``, and a number from a link (a primitive node)
is not checked against min/max at all: NaN, 1e30, 0 steps. A node calls :func:`check_inputs` first
thing in ``execute`` so the error names the node and the input, not a KeyError three calls later.
"""
from __future__ import annotations

import math

from comfy_api.latest import io

from c2c_core.errors import quote
from .errors import BridgeInputError


def check_inputs(node_cls, values: dict) -> None:
    """Every combo input of ``node_cls``'s schema present in ``values`` holds one of its options, and every
    INT/FLOAT input a finite number within its own min/max (links bypass ComfyUI's widget checks)."""
    for spec in node_cls.define_schema().inputs:
        if spec.id not in values or (values[spec.id] is None and spec.optional):
            continue
        value = values[spec.id]
        if isinstance(spec, io.Combo.Input):
            options = list(spec.options or [])
            if not isinstance(value, str) or value not in options:
                shown = options if len(options) <= 12 else options[:12] + ["…"]
                raise BridgeInputError(node_cls.NODE, spec.id, quote(value, 60), f"one of {shown}",
                                       "pick a value from the list (the prompt was probably edited by hand or made "
                                       "by another version)")
        elif isinstance(spec, (io.Int.Input, io.Float.Input)):
            lo = -math.inf if spec.min is None else spec.min
            hi = math.inf if spec.max is None else spec.max
            check_number(node_cls.NODE, spec.id, value, lo, hi, integer=isinstance(spec, io.Int.Input),
                         hint="set it within that range (a value from a link is not checked by ComfyUI)")


def check_number(node: str, input_name: str, value, lo: float, hi: float, integer: bool = False, hint: str = "") -> None:
    """A finite number in [lo, hi] (an int when ``integer``), whatever a link delivered."""
    if integer:
        ok = type(value) is int and lo <= value <= hi
    else:
        ok = type(value) in (int, float) and (type(value) is int or math.isfinite(value)) and lo <= value <= hi
    if not ok:
        what = "an integer" if integer else "a finite number"
        raise BridgeInputError(node, input_name, quote(value, 40), f"{what} from {lo:g} to {hi:g}",
                               hint or "set it within that range")
