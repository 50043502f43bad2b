"""Every exception c2c_core raises, in one place.

Why one file: callers (the ComfyUI nodes, the tools) catch these by class and show the message to
a user, so they need one import that names them all. Each class is a ValueError (or LookupError)
subclass so generic handlers still work. Messages follow one pattern: what was found, what was
expected, what to do.
"""

from __future__ import annotations


class C2CError(Exception):
    """Base of every c2c_core error; catch this to catch them all."""


class SignatureError(C2CError, ValueError):
    """A ModelSignature or TokenGrid was built from impossible numbers or a malformed dict."""


class KVShapeError(C2CError, ValueError):
    """A K/V tensor does not have the shape its signature, grid or partner tensor requires."""


class MissingLayerError(C2CError, LookupError):
    """A layer was asked for that a cache or projector bank does not hold."""


class ProjectorConfigError(C2CError, ValueError):
    """A projector kind was given hyper-parameters or model shapes it cannot work with."""


class UnknownProjectorError(ProjectorConfigError):
    """A projector kind name is not in the registry."""


class LayerMapError(C2CError, ValueError):
    """A layer map or layer spec is out of range, of an unknown kind, or has bad strengths."""


class ScheduleError(C2CError, ValueError):
    """A fusion schedule has a bad window, ramp or refresh interval."""


class FusionError(C2CError, ValueError):
    """Fusion was asked for with an inconsistent bank, map, strength or mode."""


class TokenAlignmentError(C2CError, ValueError):
    """Two tokenizations of one prompt cannot be aligned (spans out of order, image counts that differ)."""


class TrainError(C2CError, ValueError):
    """A training configuration is invalid."""


class DivergedError(TrainError):
    """A training run's loss or weights went NaN/Inf; nothing is saved from that step on."""


class ResumeError(TrainError):
    """A training checkpoint cannot be resumed with the given bank and configuration."""


class BundleError(C2CError, ValueError):
    """A file cannot be used as a projector bundle (or a safetensors-with-metadata file)."""


class BundleNotFoundError(BundleError, FileNotFoundError):
    """The bundle path does not exist or is not a regular file."""


class NotSafetensorsError(BundleError):
    """The file is not a readable safetensors file (corrupt or foreign header)."""


class UnsafeFormatError(BundleError):
    """The file is a pickle-based checkpoint; those can run code when loaded and are refused."""


class MissingMetadataError(BundleError):
    """The safetensors header has no entry under the expected metadata key."""


class InvalidMetadataError(BundleError):
    """The metadata entry exists but is not valid JSON or has wrong or missing fields."""


class FormatVersionError(BundleError):
    """The file was written by a newer format version than this code understands."""


class BundleUnknownProjectorError(BundleError, UnknownProjectorError):
    """A bundle names a projector kind this version does not know.

    Both a BundleError and an UnknownProjectorError, so either handler catches it.
    """


class MissingTensorError(BundleError):
    """A tensor the projector bank needs is absent from the file."""


class UnexpectedTensorError(BundleError):
    """The file holds tensors the projector bank does not have."""


class ShapeMismatchError(BundleError):
    """A tensor in the file has a different shape (or a non-float dtype) than the bank expects."""


class NonFiniteWeightsError(BundleError):
    """A file's weights hold NaN/Inf or magnitudes no projector uses; they would turn a picture black."""


class FileChangedError(BundleError):
    """A file was replaced, truncated or removed after its header was read; its tensors are refused."""


def quote(value, limit: int = 120) -> str:
    """``repr(value)`` cut to ``limit`` characters, so a stranger's 5 MB string never fills a message."""
    try:
        text = repr(value)
    except ValueError:            # an int too long for repr (str->int digit limit)
        text = f"<{type(value).__name__} too large to show>"
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text)} characters)"


def cut(text: str, limit: int = 600) -> str:
    """``text`` cut to ``limit`` characters with a note of the full length (messages stay readable)."""
    text = str(text)
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} characters)"
