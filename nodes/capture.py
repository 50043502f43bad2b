"""Capture KV Cache: a sharer evaluated live, in lockstep with the receiver (Record KV Cache records instead)."""
from __future__ import annotations

from comfy_api.latest import io

from c2c_core import REFRESH_MODES, LayerMapError, RefreshPolicy, ScheduleError, align, parse_layer_spec
from ..c2c_comfy.live import LiveSharer, missing_image_warnings
from ..c2c_comfy.errors import BridgeInputError
from ..c2c_comfy.validate import check_inputs
from .projector import check_projector_fits, model_signature
from .types import CATEGORY, KVSource, Projector

DEFAULT_REFRESH = RefreshPolicy()      # the refresh inputs' defaults (docs/refresh.md, "Defaults")

GRID_ALIGNMENTS = list(align.GRID_ALIGNMENTS)


class CaptureKVCache(io.ComfyNode):
    NODE = "Capture KV Cache"

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DiTCacheBridge_CaptureKVCache", display_name=cls.NODE, category=CATEGORY,
            description="The sharer model and its own conditioning, evaluated live: inside each model call of "
                        "the receiver the sharer runs on the same latent and sigma and its self-attention K/V "
                        "are captured. Both models are resident; for low VRAM use Record KV Cache instead.",
            inputs=sharer_inputs() + [
                io.String.Input("layers", default="auto",
                                tooltip="Sharer layers to capture: 'auto' captures exactly what the projector in "
                                        "Fuse Caches reads; or 'all', '0-3,7', 'last4'."),
                io.Int.Input("refresh_every", default=1, min=1, max=1000, tooltip=REFRESH_EVERY_TOOLTIP),
                io.Combo.Input("rope_alignment", options=["auto", "off"], default="auto",
                               tooltip="auto: re-rotate the sharer's keys to the receiver's RoPE positions when "
                                       "they differ (e.g. ChronoEdit under ScaleROPE scale_t 7). off: fuse as is."),
                io.Combo.Input("grid_alignment", options=GRID_ALIGNMENTS, default="refuse",
                               tooltip="When the sharer's conditioning has another latent size/length than the "
                                       "receiver's: refuse (error), or run the sharer on the receiver's latent "
                                       "resampled to its own grid and resample its K/V back (nearest/trilinear)."),
                Projector.Input("projector", optional=True,
                                tooltip="Optional: checks early that 'layers' covers what this projector reads."),
                io.Conditioning.Input("middle", optional=True,
                                      tooltip="Optional, for a receiver sampled with DualCFGGuider: the sharer's own "
                                              "middle conditioning (cond2). Not connected: its negative feeds the middle."),
            ] + refresh_inputs(),
            outputs=[KVSource.Output(tooltip="A live K/V source for Fuse Caches.")],
        )

    @classmethod
    def execute(cls, sharer, positive, negative, layers="auto", refresh_every=1, rope_alignment="auto",
                grid_alignment="refuse", projector=None, middle=None, refresh="every",
                threshold=DEFAULT_REFRESH.threshold, budget=DEFAULT_REFRESH.budget,
                max_reuse=DEFAULT_REFRESH.max_reuse) -> io.NodeOutput:
        check_inputs(cls, locals())
        policy = refresh_policy(cls.NODE, refresh, refresh_every, threshold, budget, max_reuse)
        check_same_image_grid(cls.NODE, {"positive": positive, "negative": negative, "middle": middle or []})
        return io.NodeOutput(make_live_source(cls.NODE, sharer, positive, negative, layers, policy,
                                              rope_alignment, grid_alignment, projector, middle=middle))


REFRESH_EVERY_TOOLTIP = ("refresh 'every': use fresh sharer K/V every k-th step and reuse them in between "
                         "(1 = every model call, exact lockstep).")


def refresh_inputs(every: bool = False):
    """When the sharer runs (c2c_core.refresh.RefreshPolicy); optional and added after a node's older inputs (the
    frontend orders required widgets before optional ones), so saved workflows keep their widget values.
    ``every``: include refresh_every (nodes that had none before)."""
    return ([io.Int.Input("refresh_every", default=1, min=1, max=1000, optional=True, tooltip=REFRESH_EVERY_TOOLTIP)]
            if every else []) + [
        io.Combo.Input("refresh", options=list(REFRESH_MODES), default="every", optional=True,
                       tooltip="When the sharer runs: 'every' refresh_every steps; 'adaptive' when the noise level "
                               "fell by 'threshold' of the schedule since it last ran; 'budget' at most 'budget' "
                               "times per run, late in the schedule. Reused steps cost only the blend."),
        io.Float.Input("threshold", default=DEFAULT_REFRESH.threshold, min=0.0, max=10.0, step=0.01, round=0.001,
                       optional=True,
                       tooltip="refresh 'adaptive': share of the run's noise travel (first sigma to 0) since the "
                               "sharer last ran that runs it again (0.11 = 11 %: about 6 sharer runs in 12 steps; "
                               "0 = every step, as refresh_every 1). Blind to ancestral/SDE sampler noise."),
        io.Int.Input("budget", default=DEFAULT_REFRESH.budget, min=1, max=10000, optional=True,
                     tooltip="refresh 'budget': sharer runs per sampling run (the first step always runs; the rest "
                             "at equal shares of the noise travel, which is late in the schedule)."),
        io.Int.Input("max_reuse", default=DEFAULT_REFRESH.max_reuse, min=0, max=10000, optional=True,
                     tooltip="refresh 'adaptive'/'budget': most steps in a row that reuse the sharer's K/V (budget: "
                             "where the runs left can keep every later stretch within it)."),
    ]


def refresh_policy(node: str, refresh="every", refresh_every=1, threshold=DEFAULT_REFRESH.threshold,
                   budget=DEFAULT_REFRESH.budget, max_reuse=DEFAULT_REFRESH.max_reuse) -> RefreshPolicy:
    """The node's refresh inputs as a RefreshPolicy; a value the policy refuses names the node's input and the fix."""
    try:
        return RefreshPolicy(mode=refresh, every=refresh_every, threshold=threshold, budget=budget, max_reuse=max_reuse)
    except ScheduleError as e:
        field = str(e).split("=", 1)[0].rsplit(".", 1)[-1]
        name = {"mode": "refresh", "every": "refresh_every"}.get(field, field)
        raise BridgeInputError(node, name, repr(locals().get(name, "?")), "a valid refresh setting",
                               str(e)) from e


def sharer_inputs(prefix: str = ""):
    return [
        io.Model.Input("sharer", tooltip="The model whose K/V are shared (e.g. ChronoEdit, or another Wan2.1)."),
        io.Conditioning.Input(f"{prefix}positive",
                              tooltip="The sharer's own positive conditioning (for an I2V sharer, from its "
                                      "WanImageToVideo node)."),
        io.Conditioning.Input(f"{prefix}negative", tooltip="The sharer's own negative conditioning."),
    ]


def capture_layers(node, signature, layers="auto", projector=None):
    """The sharer layers a node's 'layers' input names; None = whatever the projector needs at fusion time."""
    if layers.strip().lower() != "auto":
        try:
            return tuple(parse_layer_spec(layers, signature.num_layers))
        except (LayerMapError, ValueError) as e:
            # the core's message says what is wrong and lists the accepted forms: the one list the user reads
            raise BridgeInputError(node, "layers", repr(layers), "'auto' or a layer list", str(e)) from e
    if projector is not None:
        check_projector_fits(node, projector, signature, projector.receiver)
        return tuple(sorted(set(projector.layer_map.pairs.values())))
    return None


def check_same_image_grid(node: str, conditionings: dict) -> None:
    """An I2V sharer's positive and negative must carry image latents of one grid (checked before any model loads)."""
    grids = {}
    for input_name, conditioning in conditionings.items():
        for _, extras in conditioning:
            image = extras.get("concat_latent_image")
            if image is not None:
                grids.setdefault(tuple(image.shape[-3:]), input_name)
    if len(grids) > 1:
        (a, first), (b, second) = list(grids.items())[:2]
        raise BridgeInputError(node, second, f"an image latent of {b} (frames, height, width)",
                               f"the {a} of {first}", "feed positive and negative from the same "
                               "WanImageToVideo/ChronoEdit node")


def make_live_source(node, sharer, positive, negative, layers="auto", refresh=RefreshPolicy(), rope_alignment="auto",
                     grid_alignment="refuse", projector=None, cond_inputs=("positive", "negative", "middle"),
                     middle=None):
    signature = model_signature(node, "sharer", sharer)
    chosen = capture_layers(node, signature, layers, projector)
    warnings = missing_image_warnings(node, sharer, dict(zip(cond_inputs, (positive, negative, middle))))
    return LiveSharer(model=sharer, positive=positive, negative=negative, signature=signature, layers=chosen,
                      refresh=refresh, rope_alignment=rope_alignment,
                      grid_alignment=grid_alignment, node=node, cond_inputs=cond_inputs, middle=middle,
                      warnings=warnings)
