"""CFG branches of ComfyUI's model calls: which of the sharer's conditionings feeds each chunk.

A branch is ``c2c_core.contract.POSITIVE``, ``NEGATIVE`` or ``MIDDLE`` (the one word both hosts use). ComfyUI hands
each model call its chunks as ``transformer_options["cond_or_uncond"]`` (indexes into the *guider's
own* cond list, so DualCFGGuider's (negative, middle, positive) arrive as 2, 1, 0) and
``transformer_options["uuids"]`` (one per cond entry, stable for the whole run). A bridge therefore
keys branches by uuid, never by list position: at the start of a run every uuid of the guider's named
conds is mapped to the sharer's positive or negative branch (DualCFG's ``middle`` and PerpNeg's
``empty_negative_prompt`` are what ComfyUI itself marks ``prompt_type: negative``; a live sharer given
its own middle conditioning feeds DualCFG's middle from its ``MIDDLE`` branch instead), and a guider
with other names is refused before the first step.
"""
from __future__ import annotations

from c2c_core.contract import MIDDLE, NEGATIVE, POSITIVE

from .errors import BridgeInputError

# guider cond name -> the sharer conditioning (branch) that feeds it
BRANCH_OF = {"positive": POSITIVE, "negative": NEGATIVE, "middle": NEGATIVE, "empty_negative_prompt": NEGATIVE}


def branch_map(guider, node: str, model_input: str = "model", middle: bool = False) -> dict:
    """{cond uuid: branch} for every cond of ``guider``; refuses a guider whose conds have other names.

    middle: the sharer has its own middle conditioning (DualCFG's ``middle`` then takes it, not its negative).
    """
    conds = getattr(guider, "conds", None) or getattr(guider, "original_conds", None) or {}
    unknown = sorted(name for name in conds if name not in BRANCH_OF)
    if unknown:
        raise BridgeInputError(
            node, model_input, f"a {type(guider).__name__} guider whose conditionings are named "
            f"{sorted(conds)}", "a guider whose conditionings are positive/negative (KSampler, CFGGuider, "
            "BasicGuider, DualCFGGuider, PerpNegGuider)",
            f"sample the bridged model with one of those guiders: the bridge cannot tell which of the sharer's "
            f"conditionings feeds {unknown}")
    branch_of = BRANCH_OF | {"middle": MIDDLE} if middle else BRANCH_OF
    return {entry["uuid"]: branch_of[name] for name, entries in conds.items() for entry in entries or ()
            if "uuid" in entry}


def call_branches(transformer_options: dict, branches: dict, node: str, model_input: str = "model") -> tuple:
    """Branch of each chunk of one model call, in the call's order."""
    uuids = transformer_options.get("uuids")
    if uuids is None:       # a host without uuids: chunk indexes are then the guider's cond order (CFGGuider)
        return tuple(POSITIVE if i == 0 else NEGATIVE for i in transformer_options.get("cond_or_uncond", [0]))
    try:
        return tuple(branches[u] for u in uuids)
    except KeyError:
        raise BridgeInputError(
            node, model_input, "a model call for a conditioning that is none of the guider's own",
            "the guider's positive/negative conditionings",
            "remove nodes that add conditionings at sampling time from the bridged model") from None
