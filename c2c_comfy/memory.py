"""Memory a bridged run adds, estimated before sampling and handed to ComfyUI's memory manager.

ComfyUI decides how much of a model to load (fully, or partially with ``--lowvram`` style weight
streaming) from its own estimate of the sampling run's activations. A bridged run adds to that:
the sharer's activations while its forward is alive next to the receiver's (in both live modes the
sharer runs inside a receiver call), the sharer K/V held for fusion, their projections kept while
they are reused, and the projector bank on the device. ``reserve`` adds a PREPARE_SAMPLING wrapper to the
bridged clone that reserves those bytes while ComfyUI loads the models for the run, so it offloads
enough instead of running out of memory mid-step. ``check_recording_fits`` refuses a recording that
cannot fit in the free RAM or disk before the sharer runs.

All sizes are arithmetic on shapes (docs/memory.md has the formulas and the Wan2.1-14B numbers).
"""
from __future__ import annotations

import copy
import logging
import shutil
from dataclasses import dataclass

import comfy.patcher_extension

from c2c_core.recording import STORAGE_DTYPES
from c2c_core.runtime import BankCache
from . import compat
from .errors import BridgeInputError

log = logging.getLogger("dit_cache_bridge")
GB = 1024 ** 3


@dataclass(frozen=True)
class BridgeMemory:
    """Extra device bytes of one bridged run, by cause."""
    sharer_activations: int = 0     # the sharer's forward alive inside a receiver call (both live modes)
    captured_kv: int = 0            # sharer K/V held at peak
    projected_kv: int = 0           # the projector's sharer side of every fused layer, kept while K/V are reused
    projector_bank: int = 0         # the bank's parameters on the device
    recording_buffers: int = 0      # replayed K/V of one layer moved to the device

    @property
    def total(self) -> int:
        return (self.sharer_activations + self.captured_kv + self.projected_kv + self.projector_bank
                + self.recording_buffers)

    def describe(self) -> str:
        parts = ", ".join(f"{name.replace('_', ' ')} {gb(value)}" for name, value in vars(self).items() if value)
        return f"{gb(self.total)} ({parts or 'nothing'})"


def gb(nbytes: float) -> str:
    """A size in GB (MB or KB when smaller), two decimals, as messages and the docs print it."""
    for unit, scale in (("GB", GB), ("MB", 1024 ** 2)):
        if nbytes >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes / 1024:.2f} KB"


def kv_layer_bytes(tokens: int, heads: int, head_dim: int, chunks: int, itemsize: int) -> int:
    """K + V of one layer for ``chunks`` CFG chunks of ``tokens`` tokens."""
    return 2 * chunks * tokens * heads * head_dim * itemsize


def bank_bytes(bank, itemsize: int) -> int:
    """The projector bank's parameters in the run's compute dtype."""
    return sum(p.numel() for p in bank.parameters()) * itemsize


def projected_bytes(bank, fused_layers, *, tokens: int, chunks: int, itemsize: int) -> int:
    """What ``FusionRun.sharer_part`` keeps while the sharer's K/V are reused: K and V of every fused receiver layer
    through its projector's sharer side (the MLP output of ``full``, the ``in_sharer`` branch of ``c2c``, the
    aligned sharer K/V otherwise), in the receiver's compute dtype. Widths are read off each projector with a
    one-token probe, so every kind counts what it really keeps."""
    import torch
    sig = bank.sharer
    device = next(bank.parameters(), torch.zeros(0)).device        # a bank built on "meta" is probed there
    probe = torch.zeros(1, 1, sig.num_heads, sig.head_dim, device=device)
    with torch.no_grad():
        per_token = sum(bank.projector(layer, which).sharer_part(probe).numel()
                        for layer in fused_layers for which in ("k", "v"))
    return per_token * chunks * tokens * itemsize


def live_estimate(*, tokens: int, chunks: int, sharer_heads: int, sharer_head_dim: int, sharer_layers: int,
                  itemsize: int, bank: int, streaming: bool, sharer_activations: int,
                  projected: int = 0) -> BridgeMemory:
    """Live mode. The sharer runs inside a receiver call in both modes, so its whole forward's activations add to
    the receiver's (which ComfyUI reserves itself: its own estimate is the peak of one block, and the receiver's
    tensors alive at the hand-off are no more than that).

    Lockstep: the sharer's forward is suspended inside its block while the receiver runs; one sharer layer of
    K/V is held. Buffered (the sharer's K/V are reused across steps, or no lockstep): the sharer's forward runs
    to its last captured layer nested in the receiver's first fused block (the refresh decision is made there),
    so at that moment the receiver's block, the sharer's whole forward and every captured layer are alive
    together, and, when the K/V are reused, the previous window's ``projected`` sharer sides of every fused
    layer too (they are replaced layer by layer only after the sharer has run).
    """
    layer = kv_layer_bytes(tokens, sharer_heads, sharer_head_dim, chunks, itemsize)
    if streaming:
        return BridgeMemory(sharer_activations=sharer_activations, captured_kv=layer, projector_bank=bank)
    return BridgeMemory(sharer_activations=sharer_activations, captured_kv=sharer_layers * layer,
                        projected_kv=projected, projector_bank=bank)


def replay_estimate(*, tokens: int, chunks: int, sharer_heads: int, sharer_head_dim: int, itemsize: int,
                    bank: int) -> BridgeMemory:
    """Recorded mode, replay: the recording stays in RAM or on disk; one layer at a time comes to the device."""
    return BridgeMemory(projector_bank=bank,
                        recording_buffers=kv_layer_bytes(tokens, sharer_heads, sharer_head_dim, chunks, itemsize))


def recording_bytes(*, steps: int, chunks: int, layers: int, tokens: int, heads: int, head_dim: int,
                    storage_dtype: str) -> int:
    """Size of a recording: every step × CFG chunk × layer × (K + V); fp8 adds one scale per tensor."""
    itemsize = _itemsize(storage_dtype)
    scales = 2 * 4 if storage_dtype.startswith("fp8") else 0
    return steps * chunks * layers * (kv_layer_bytes(tokens, heads, head_dim, 1, itemsize) + scales)


def _itemsize(storage_dtype: str) -> int:
    if storage_dtype in STORAGE_DTYPES:
        return STORAGE_DTYPES[storage_dtype].itemsize
    return 1 if storage_dtype.startswith("fp8") else 2


def free_ram() -> int:
    import psutil
    return int(psutil.virtual_memory().available)


def free_disk(folder) -> int:
    return int(shutil.disk_usage(folder).free)


def check_recording_fits(node: str, nbytes: int, storage: str, folder=None, *, layers_input: str = "layers",
                         available: int | None = None) -> None:
    """Refuse a recording larger than the free RAM (storage 'ram') or the free disk of ``folder`` ('disk').

    Half of what is free is the limit: ComfyUI, the models and the receiver's run need the rest. Above a
    quarter a warning is logged.
    """
    where = "RAM" if storage == "ram" else f"disk space in {folder}"
    if available is None:
        available = free_ram() if storage == "ram" else free_disk(folder)
    if nbytes > available // 2:
        fix = (f"record fewer layers ('{layers_input}': connect the projector so 'auto' records only what it reads, "
               "or list them), use storage_dtype fp8 or bf16, fewer steps or a smaller latent")
        if storage == "ram":
            fix += ", or storage 'disk'"
        raise BridgeInputError(node, layers_input, f"a recording of {gb(nbytes)}",
                               f"at most half the free {where} ({gb(available)} free)", fix)
    if nbytes > available // 4:
        log.warning("dit_cache_bridge: %s records %s, over a quarter of the free %s (%s)", node, gb(nbytes), where,
                    gb(available))


def activation_bytes(patcher, noise_shape, chunks: int) -> int:
    """ComfyUI's own activation estimate of one model call of ``chunks`` CFG chunks."""
    return compat.memory_required(patcher, [noise_shape[0] * chunks] + list(noise_shape[1:]))


def reserve(patched, key: str, estimate) -> None:
    """Reserve ``estimate(receiver_patcher, noise_shape, conds)`` (a BridgeMemory) while ComfyUI loads models for a run.

    A PREPARE_SAMPLING wrapper on the bridged clone raises ComfyUI's reserved memory by the estimate for
    the duration of ``prepare_sampling`` only, so ``load_models_gpu`` frees and partially loads as if the
    receiver itself needed those bytes. The previous value is always restored.
    """
    def prepare_sampling(executor, model, noise_shape, conds, *args, **kwargs):
        extra = estimate(model, noise_shape, conds)
        log.info("dit_cache_bridge: the bridged run needs %s more device memory", extra.describe())
        with reserved(extra.total):
            return executor(model, noise_shape, conds, *args, **kwargs)
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.PREPARE_SAMPLING, key, prepare_sampling)


class reserved:
    """Context: ComfyUI's reserved device memory raised by ``nbytes`` (restored on exit)."""

    def __init__(self, nbytes: int):
        self.nbytes = int(nbytes)

    def __enter__(self):
        compat.reserve_device_memory(self.nbytes)
        return self

    def __exit__(self, *exc):
        compat.reserve_device_memory(-self.nbytes)


def chunks_of(conds) -> int:
    """CFG chunks one model call can carry: 2 when there is a negative (batched CFG), else 1.

    prepare_sampling does not see the cfg scale, so cfg 1 with a negative connected counts 2 (an overestimate).
    """
    return 2 if conds.get("negative") else 1


def register_bank(bridge, patched, receiver):
    """The projector bank as a model ComfyUI manages: loaded to the device with the receiver, counted, offloaded.

    A copy of the bank in the receiver's compute dtype goes into a ModelPatcher registered as an additional
    model of the bridged clone; the bridge's runtime then uses that module where ComfyUI put it (no copy of
    its own on the device, nothing kept outside ComfyUI's memory manager). Returns the patcher.
    """
    bank = copy.deepcopy(bridge.bundle.bank).to(dtype=compat.compute_dtype(receiver)).eval()
    patcher = compat.module_patcher(bank, receiver.load_device, receiver.offload_device)
    patched.set_additional_models(f"{bridge.key}.projector", [patcher])
    bridge.banks = BankCache(bank)
    return patcher


def live_reservation(bridge, source):
    """The estimate function ``reserve`` calls for a live source attached to ``bridge``."""
    def estimate(receiver, noise_shape, conds):
        sig, chunks = bridge.bundle.sharer, chunks_of(conds)
        tokens = compat.token_grid(noise_shape).numel
        streaming = source.streaming and source.refresh.always
        projected = 0 if source.refresh.always else projected_bytes(   # reused K/V: sharer_part's cache
            bridge.bundle.bank, bridge.fused_layers, tokens=tokens, chunks=chunks, itemsize=_compute_itemsize(receiver))
        return live_estimate(tokens=tokens, chunks=chunks, sharer_heads=sig.num_heads, sharer_head_dim=sig.head_dim,
                             sharer_layers=len(bridge.sharer_layers), itemsize=_compute_itemsize(bridge.sharer_patcher),
                             bank=0, streaming=streaming,     # the bank is a model ComfyUI loads and counts
                             sharer_activations=activation_bytes(bridge.sharer_patcher, noise_shape, chunks),
                             projected=projected)
    return estimate


def replay_reservation(bridge, source):
    """The estimate function ``reserve`` calls for a recorded source (replayed K/V in the receiver's dtype)."""
    def estimate(receiver, noise_shape, conds):
        sig, itemsize = bridge.bundle.sharer, _compute_itemsize(receiver)
        return replay_estimate(tokens=compat.token_grid(noise_shape).numel, chunks=chunks_of(conds),
                               sharer_heads=sig.num_heads, sharer_head_dim=sig.head_dim, itemsize=itemsize,
                               bank=0)                           # counted by ComfyUI (register_bank)
    return estimate


def _compute_itemsize(patcher) -> int:
    return compat.compute_dtype(patcher).itemsize


def release(patcher) -> int:
    """Unload every loaded copy of ``patcher``'s model; returns how many were unloaded."""
    return compat.unload(patcher)


def is_loaded(patcher) -> bool:
    return compat.is_loaded(patcher)
