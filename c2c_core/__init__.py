"""c2c_core: the framework-free fusion engine of DiT Cache Bridge.

Fuses one Diffusion Transformer's self-attention K/V into another's (Cache-to-Cache, adapted to
Wan2.1-style video DiTs). Imports only torch, einops, safetensors, greenlet (optional: lockstep.py) and the
standard library; never ComfyUI or diffusers, so every piece can be tested without a host. Start with docs/core_api.md.

What is exported here is the public API (docs/architecture.md, "c2c_core's public API"); the one
fusion path every host uses is :class:`FusionRun` (``runtime.py``).
"""

from .align import (
    RESAMPLE_MODES,
    RopeRerotation,
    RopeSpec,
    align_kv,
    rerotate_keys,
    resample_tokens,
    rope_frequencies,
    rope_positions,
    rope_rotate,
)
from .arch import wan_rope_axes
from .bundle import ProjectorBundle, load_bundle, save_bundle
from .bundle_schema import FORMAT_VERSION
from .errors import (
    BundleError,
    BundleNotFoundError,
    C2CError,
    DivergedError,
    FormatVersionError,
    FusionError,
    InvalidMetadataError,
    KVShapeError,
    LayerMapError,
    MissingLayerError,
    MissingMetadataError,
    MissingTensorError,
    NotSafetensorsError,
    ProjectorConfigError,
    ResumeError,
    ScheduleError,
    ShapeMismatchError,
    SignatureError,
    TrainError,
    UnexpectedTensorError,
    UnknownProjectorError,
    UnsafeFormatError,
)
from .fusion import fuse
from .signature import ModelSignature, TokenGrid, from_heads, to_heads
from .mapping import COMPUTED_MAP_KINDS, LAYER_MAP_KINDS, LayerMap, parse_layer_spec
from .projectors import (
    GATING_GRANULARITIES,
    PROJECTOR_KINDS,
    PROJECTORS,
    Projector,
    ProjectorBank,
    build_projector,
    static_gate,
    register_projector,
)
from .schedule import RAMPS, FusionSchedule
from .runtime import BankCache, FusionRun, RunReport, percent_of, step_index
from .refresh import REFRESH_MODES, SIGNALS, Refresh, RefreshPolicy, RefreshReport, RefreshTracker
from .tensorfile import read_meta, save_tensors_with_meta
from .train import DECAYS, LOSS_KINDS, TrainConfig, TrainResult, distill_loss, kv_loss, train_bank, velocity_loss

__all__ = [
    "RESAMPLE_MODES",
    "RopeRerotation",
    "RopeSpec",
    "align_kv",
    "rerotate_keys",
    "resample_tokens",
    "rope_frequencies",
    "rope_positions",
    "rope_rotate",
    "wan_rope_axes",
    "FORMAT_VERSION",
    "ProjectorBundle",
    "load_bundle",
    "read_meta",
    "save_bundle",
    "save_tensors_with_meta",
    "BundleError",
    "BundleNotFoundError",
    "C2CError",
    "DivergedError",
    "FormatVersionError",
    "FusionError",
    "InvalidMetadataError",
    "KVShapeError",
    "LayerMapError",
    "MissingLayerError",
    "MissingMetadataError",
    "MissingTensorError",
    "NotSafetensorsError",
    "ProjectorConfigError",
    "ResumeError",
    "ScheduleError",
    "ShapeMismatchError",
    "SignatureError",
    "TrainError",
    "UnexpectedTensorError",
    "UnknownProjectorError",
    "UnsafeFormatError",
    "fuse",
    "ModelSignature",
    "TokenGrid",
    "from_heads",
    "to_heads",
    "COMPUTED_MAP_KINDS",
    "LAYER_MAP_KINDS",
    "LayerMap",
    "parse_layer_spec",
    "GATING_GRANULARITIES",
    "PROJECTOR_KINDS",
    "PROJECTORS",
    "Projector",
    "ProjectorBank",
    "build_projector",
    "static_gate",
    "register_projector",
    "RAMPS",
    "FusionSchedule",
    "BankCache",
    "FusionRun",
    "RunReport",
    "percent_of",
    "step_index",
    "REFRESH_MODES",
    "SIGNALS",
    "Refresh",
    "RefreshPolicy",
    "RefreshReport",
    "RefreshTracker",
    "DECAYS",
    "LOSS_KINDS",
    "TrainConfig",
    "TrainResult",
    "distill_loss",
    "kv_loss",
    "train_bank",
    "velocity_loss",
]
