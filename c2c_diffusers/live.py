"""Live K/V source: the sharer transformer runs in lockstep inside each receiver call.

The sharer sees the receiver's noisy latent and timestep (Wan is a flow model: the same timestep is
the same noise level for both), plus its own conditioning (:class:`SharerInputs`) for the call's CFG
branch. Its forward stops right after the last layer the projector reads. With a schedule's
``refresh_every = k`` the sharer's K/V of a branch are reused for k−1 steps. With a ``backward`` bundle
the sharer also receives the receiver's K/V, block by block (``lockstep.py``: bidirectional fusion).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from c2c_core.align import GRID_ALIGNMENTS
from c2c_core.capture import CapturedKV
from c2c_core.contract import POSITIVE, Call, SharerDone, SourceReport
from c2c_core.runtime import BankCache

from . import lockstep, models
from .bridge import check_architecture
from .errors import BridgeSetupError
from .hooks import add_taps, remove_taps

__all__ = ["SharerInputs", "LiveSharer", "LiveSharerRun"]


@dataclass
class SharerInputs:
    """What the sharer needs beside the latent and timestep it shares with the receiver.

    prompt_embeds / negative_prompt_embeds: its text embeddings (B or 1, L, text_dim) for the "cond" and
    "uncond" branches. image_embeds: ``encoder_hidden_states_image`` (Wan I2V, ChronoEdit). condition:
    the (B or 1, 20, T, H, W) mask + image latent an I2V/ChronoEdit transformer takes after the noisy
    latent's channels (what its pipeline's ``prepare_latents`` returns as ``condition``).
    """

    prompt_embeds: Tensor
    negative_prompt_embeds: Optional[Tensor] = None
    image_embeds: Optional[Tensor] = None
    condition: Optional[Tensor] = None


def _batch(t: Optional[Tensor], rows: int, device, dtype) -> Optional[Tensor]:
    if t is None:
        return None
    t = t.to(device=device, dtype=dtype)
    return t.expand(rows, *t.shape[1:]) if t.shape[0] == 1 and rows > 1 else t


class LiveSharer:
    """A sharer transformer evaluated in lockstep inside each receiver call.

    backward: a projector bundle from the receiver (its sharer side) to this sharer (its receiver side),
        e.g. one built with the two models swapped, for bidirectional fusion: the sharer then steps block
        by block with the receiver and receives the receiver's K/V (``lockstep.py``; needs greenlet and
        ``refresh_every`` 1). backward_strength: its global strength (0 = one way, bit for bit).
    """

    def __init__(self, transformer, inputs: SharerInputs, grid_alignment: str = "refuse", backward=None,
                 backward_strength: float = 1.0):
        if grid_alignment not in GRID_ALIGNMENTS:
            raise BridgeSetupError(f"grid_alignment={grid_alignment!r}; expected one of {GRID_ALIGNMENTS}.")
        self.transformer = transformer
        self.inputs = inputs
        self.grid_alignment = grid_alignment
        self.signature = models.signature(transformer)
        self.backward = backward
        self.backward_strength = backward_strength
        self._backward_banks = None
        if backward is not None:
            if not lockstep.available():
                raise BridgeSetupError("bidirectional fusion (LiveSharer(backward=...)) needs the Python package "
                                       "greenlet; run `pip install greenlet` (a dependency of dit-cache-bridge) or "
                                       "fuse one way.")
            if isinstance(backward_strength, bool) or not isinstance(backward_strength, (int, float)) \
                    or not 0.0 <= backward_strength <= 10.0:
                raise BridgeSetupError(f"backward_strength={backward_strength!r}; expected a number in [0, 10].")
            if not backward.receiver.same_shape(self.signature):
                r = backward.receiver
                raise BridgeSetupError(
                    f"the backward projector feeds a model of {r.num_layers} layers × {r.num_heads} heads × "
                    f"{r.head_dim}; this sharer has {self.signature.num_layers} × {self.signature.num_heads} × "
                    f"{self.signature.head_dim}. Build it with the two models swapped (sharer = the receiver).")
            self._backward_banks = BankCache(backward.bank)
        in_channels, out_channels = transformer.config.in_channels, transformer.config.out_channels
        extra = 0 if inputs.condition is None else inputs.condition.shape[1]
        if out_channels + extra != in_channels:
            raise BridgeSetupError(
                f"sharer {type(transformer).__name__} takes {in_channels} input channels; the latent has "
                f"{out_channels} and SharerInputs.condition adds {extra}. "
                + ("Pass the condition (mask + image latent) its pipeline's prepare_latents returns."
                   if extra == 0 else "Drop SharerInputs.condition for a text-to-video sharer."))
        image_dim = getattr(transformer.config, "image_dim", None)
        if image_dim is not None and inputs.image_embeds is None:
            # ComfyUI runs such a model without CLIP-vision features (its image cross-attention then reads the
            # text tokens); diffusers' processor reads no image tokens instead. The two would differ: refuse.
            raise BridgeSetupError(
                f"sharer {type(transformer).__name__} has a CLIP image projection (image_dim {image_dim}) and "
                f"SharerInputs.image_embeds is None; pass the image encoder's features (pipe.encode_image(image), "
                f"or WanChronoEditBridge, which encodes the image itself).")
        self._key = None

    def attach(self, bridge) -> None:
        if not self.signature.same_shape(bridge.bundle.sharer):
            s = bridge.bundle.sharer
            raise BridgeSetupError(
                f"sharer {type(self.transformer).__name__} has {self.signature.num_layers} layers × "
                f"{self.signature.num_heads} heads × {self.signature.head_dim}; the projector bundle was made for "
                f"{s.num_layers} × {s.num_heads} × {s.head_dim}. Use a bundle for this sharer.")
        check_architecture(bridge.bundle, "sharer", self.signature)
        if self._key is not None:
            raise BridgeSetupError("this LiveSharer is already attached to a bridge; make one per bridge.")
        if self.backward is not None:
            if not self.backward.sharer.same_shape(bridge.bundle.receiver):
                s, r = self.backward.sharer, bridge.bundle.receiver
                raise BridgeSetupError(
                    f"the backward projector reads a model of {s.num_layers} layers × {s.num_heads} heads × "
                    f"{s.head_dim}; the receiver has {r.num_layers} × {r.num_heads} × {r.head_dim}. Build it with "
                    f"the two models swapped (sharer = the receiver).")
            check_architecture(self.backward, "receiver", self.signature)
            if bridge.refresh.every != 1:
                raise BridgeSetupError(
                    f"bidirectional fusion with refresh_every {bridge.refresh.every}; expected 1 (both "
                    f"models run block by block in every call). Set RefreshPolicy(every=1) or fuse one way.")
        self._key = bridge.key + ".sharer"
        self._run = None
        add_taps(self.transformer, bridge.sharer_layers, self._key, self._capture)

    def detach(self, bridge) -> None:
        if self._key is not None:
            remove_taps(self.transformer, self._key)
            self._key = None

    def open_run(self, bridge, receiver_shape):
        run = LiveSharerRun(self, bridge, receiver_shape)
        if self.backward is not None:
            if any(t is self.transformer for t in bridge.receivers):
                raise BridgeSetupError("bidirectional fusion needs two transformer objects; the sharer is the "
                                       "receiver itself. Load the sharer separately or fuse one way.")
            run = lockstep.LockstepRun(run, self.backward, self.backward_strength, self._backward_banks)
        self._run = run
        return run

    def _capture(self, layer, k, v):
        run = self._run
        if run is not None and run.capturing:
            return run.capture(layer, k, v)
        return k, v


class LiveSharerRun:
    """Per-run side of a LiveSharer (a ``c2c_core.contract.KVSourceRun``): the sharer's grid and positions, and
    its captured K/V (one branch per call: diffusers' pipelines call the transformer once per branch)."""

    def __init__(self, source: LiveSharer, bridge, receiver_shape):
        self.source, self.bridge = source, bridge
        self.transformer = source.transformer
        self.layers = bridge.sharer_layers
        self.refresh = bridge.refresh.every
        shape = tuple(receiver_shape[-3:])
        if source.inputs.condition is not None:
            shape = tuple(source.inputs.condition.shape[-3:])
            if shape != tuple(receiver_shape[-3:]) and source.grid_alignment == "refuse":
                raise BridgeSetupError(
                    f"the sharer's condition latent is {shape} (frames, height, width) but the receiver samples "
                    f"{tuple(receiver_shape[-3:])}; expected equal. Give both pipelines the same num_frames, height "
                    f"and width, or use LiveSharer(grid_alignment='nearest' or 'trilinear') to resample.")
        self.shape = shape
        self.grid_mode = "nearest" if source.grid_alignment == "refuse" else source.grid_alignment
        self.grid = models.token_grid(self.transformer, shape)
        self.rope = models.rope_spec(self.transformer, shape)
        self.captured = CapturedKV()
        self.capturing = False
        self.forwards = 0
        self._branch = None

    def ensure(self, call: Call) -> None:
        (branch,) = call.branches
        if self.captured.window.get(branch) == call.window:
            return
        if self.refresh == 1:
            self.captured.clear()        # lockstep: only this call's K/V are ever needed
        else:
            self.captured.drop((branch,))
        self._branch = branch
        self._run_sharer(call)
        self.captured.window[branch] = call.window

    def sharer_kwargs(self, call: Call) -> dict:
        """The sharer's forward arguments for ``call``: its latent (resampled to its grid), timestep, conditioning."""
        t, inputs = self.transformer, self.source.inputs
        param = next(t.parameters())
        dtype = param.dtype
        device = call.latent.device
        x = call.latent[:, : t.config.out_channels]
        rows = x.shape[0]
        if tuple(x.shape[-3:]) != self.shape:
            x = torch.nn.functional.interpolate(x.float(), size=self.shape, mode=self.grid_mode)
        x = x.to(dtype)
        condition = _batch(inputs.condition, rows, device, dtype)
        if condition is not None:
            x = torch.cat([x, condition], dim=1)
        (branch,) = call.branches
        embeds = inputs.prompt_embeds if branch == POSITIVE else inputs.negative_prompt_embeds
        if embeds is None:
            raise BridgeSetupError(
                "the receiver runs a negative ('uncond') branch but SharerInputs.negative_prompt_embeds is None; "
                "pass the sharer's negative prompt embeddings, or sample the receiver with guidance_scale 1.")
        kwargs = dict(hidden_states=x, timestep=call.timestep, encoder_hidden_states=_batch(embeds, rows, device, dtype),
                      return_dict=False)
        if inputs.image_embeds is not None:
            kwargs["encoder_hidden_states_image"] = _batch(inputs.image_embeds, rows, device, dtype)
        return kwargs

    def _run_sharer(self, call: Call) -> None:
        kwargs = self.sharer_kwargs(call)
        t = self.transformer
        self.bridge.in_sharer = True
        self.capturing = True
        try:
            with torch.no_grad():        # the sharer is never trained through: no graph for its forward
                t(**kwargs)
        except SharerDone:
            pass
        finally:
            self.capturing = False
            self.bridge.in_sharer = False
        self.forwards += 1
        missing = [layer for layer in self.layers if not self.captured.has(layer, self._branch)]
        if missing:
            raise BridgeSetupError(f"the sharer's forward never reached self-attention of layers {missing}; expected "
                                   f"a Wan-family transformer that runs every block.")

    def offer(self, layer, k, v) -> None:
        """One way: the receiver's K/V are not read."""

    def capture(self, layer, k, v):
        if layer in self.layers:
            self.captured.put(layer, k, v, (self._branch,))
            if layer == self.layers[-1]:
                raise SharerDone()
        return k, v

    def kv(self, layer, call: Call):
        return self.captured.get(layer, call.branches)

    def close(self) -> SourceReport:
        report = SourceReport(self.forwards, self.captured.peak_bytes, self.captured.copied_bytes)
        self.captured = CapturedKV()
        self.source._run = None
        return report
