"""c2c_diffusers: the DiT Cache Bridge for diffusers pipelines (Wan2.1, Wan2.2, ChronoEdit).

Imports diffusers and c2c_core, never ComfyUI; diffusers is an optional extra
(``pip install dit-cache-bridge[diffusers]``). Two-line attach::

    bridge = Bridge(LiveSharer(chronoedit.transformer, inputs), load_bundle("projector.safetensors"))
    bridge.attach(wan_pipe)          # ... wan_pipe(...) now fuses; bridge.detach() undoes it

Or the one-call API: ``WanChronoEditBridge(config=WanChronoEditConfig(...) or BridgeConfig(...), wan_model=wan_pipe,
chronoedit_model=chronoedit_pipe).generate_with_fusion(...)`` (also importable as ``wan_chronoedit``).
See docs/diffusers.md.
"""
from .api import BridgeConfig, WanChronoEditBridge, WanChronoEditConfig
from .bridge import Bridge, C2CBridgeConfig, apply_c2c_bridge, remove_c2c_bridge
from .errors import BridgeSetupError
from .live import LiveSharer, SharerInputs
from .recorded import KVRecorder, RecordedSharer
# text-encoder pairs (issue 22): Qwen3-VL -> Qwen2.5-VL in QwenImagePipeline / QwenImageEditPipeline
from .text_encoder import (TextEncoderBridge, TextEncoderBridgeConfig, apply_text_encoder_bridge,
                           remove_text_encoder_bridge)

__all__ = ["Bridge", "BridgeConfig", "BridgeSetupError", "C2CBridgeConfig", "KVRecorder", "LiveSharer", "RecordedSharer",
           "SharerInputs", "WanChronoEditBridge", "WanChronoEditConfig", "apply_c2c_bridge", "remove_c2c_bridge",
           "TextEncoderBridge", "TextEncoderBridgeConfig", "apply_text_encoder_bridge", "remove_text_encoder_bridge"]
