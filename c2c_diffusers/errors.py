"""The error a diffusers user gets for anything the bridge cannot do with what it was given.

The message is the interface: what was found, what was expected, what to do.
"""
from __future__ import annotations

from c2c_core import C2CError


class BridgeSetupError(C2CError, ValueError):
    """A model, pipeline, input or call order the diffusers bridge cannot work with."""
