"""The design document's import name: ``from wan_chronoedit import WanChronoEditBridge, WanChronoEditConfig``.

A thin door to c2c_diffusers (the diffusers host), which holds the implementation; docs/diffusers.md.
"""
from c2c_diffusers.api import BridgeConfig, WanChronoEditBridge, WanChronoEditConfig
from c2c_diffusers.errors import BridgeSetupError

__all__ = ["BridgeConfig", "BridgeSetupError", "WanChronoEditBridge", "WanChronoEditConfig"]
