"""The host-free fusion runtime: one sampling run's worth of turning sharer K/V into fused receiver K/V.

Every host (ComfyUI's bridge, the diffusers bridge, projector training) fuses through
:class:`FusionRun`; hosts differ only in how they find the attention hook point and how they tell
a call's CFG branches apart (c2c_core.contract). One run is created per sampling run::

    run = FusionRun(bundle, schedule, strength, sharer_rope=..., receiver_rope=...,
                    sharer_grid=..., receiver_grid=..., device=..., dtype=...)
    for each model call:
        if run.begin_call(percent):             # percent through the noise schedule, a Python float
            for each fused layer:               # as the host's attention has them
                pk, pv = run.sharer_part(layer, sk, sv, key)   # aligned + projected sharer side, cached per key
                k, v = run.blend(layer, k, v, pk, pv)          # = run.fuse_tokens(layer, k, v, sk, sv, key)
    report = run.close(source_report, tracker_report)   # contract.SourceReport, refresh.RefreshReport.to_json()

The per-layer path stays sync-free, because it runs for every fused layer of every model call:
strengths are Python floats decided before any tensor is touched, RoPE
re-rotation tables are built once per run (not per layer or call), statistics stay on the device
until :meth:`FusionRun.close`, and nothing in the per-layer path reads a GPU tensor.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Callable, Hashable, Mapping, Optional, Sequence

import torch
from torch import Tensor

from .align import RopeRerotation, RopeSpec, resample_tokens
from .contract import SourceReport
from .errors import FusionError, KVShapeError
from .fusion import check_fusion, fuse, lerp
from .health import FiniteWatch, note_finite, strict_json
from .signature import TokenGrid
from .projectors import ProjectorBank, static_gate
from .schedule import FusionSchedule

__all__ = ["FusionRun", "LayerBlend", "RunReport", "BankCache", "step_index", "percent_of"]


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def step_index(schedule: Sequence[float], value: float) -> int:
    """Index of the step a sigma (or timestep) belongs to in a descending ``schedule`` of step boundaries.

    ``schedule`` holds the values at which steps start plus the final one (n + 1 entries for n
    steps, as ComfyUI's ``sigmas`` or a diffusers scheduler's timesteps with an end value).
    Samplers may evaluate between two boundaries; such a value belongs to the step it lies in. A
    value equal to a boundary belongs to the step starting there.
    """
    step = 0
    for i, s in enumerate(list(schedule)[:-1]):
        if float(s) >= value - 1e-7 * max(1.0, abs(value)):
            step = i
    return step


def percent_of(value: float, to_value: Callable[[float], float], snap: Sequence[float] = (), tol: float = 1e-12) -> float:
    """Percent p in [0, 1] with ``to_value(p) == value``, for a decreasing ``to_value`` (percent -> sigma).

    Hosts give their own conversion (ComfyUI: ``model_sampling.percent_to_sigma``), so windows follow
    the host's convention and split samplers or partial denoise line up with its core nodes. The
    inverse is found by bisection in Python floats. Each percent in ``snap`` (a window's start and
    end) whose own value equals ``value`` up to float32 rounding (samplers hold sigmas in float32)
    is returned exactly, so a step that sits on a window edge is inside it, as ComfyUI's own
    comparison of a float32 sigma against ``percent_to_sigma`` says.
    """
    value = float(value)
    for p in snap:
        if abs(float(to_value(p)) - value) <= 1e-6 * max(1.0, abs(value)):
            return float(p)
    lo, hi = 0.0, 1.0
    if value >= float(to_value(lo)):
        return 0.0
    if value <= float(to_value(hi)):
        return 1.0
    while hi - lo > tol:
        mid = 0.5 * (lo + hi)
        if float(to_value(mid)) > value:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


class BankCache:
    """The projector bank on a run's device and dtype; the user's bank object is never moved.

    Kept by the host across runs (one placed copy at a time), so a second run on the same device
    reuses it instead of copying the bank again.
    """

    def __init__(self, bank: ProjectorBank):
        self.bank = bank
        self._placed: dict = {}

    def on(self, device, dtype) -> ProjectorBank:
        first = next(iter(self.bank.parameters()), None)
        if device is None or first is None or (first.device == torch.device(device) and first.dtype == dtype):
            return self.bank
        key = (str(device), dtype)
        if key not in self._placed:
            self._placed = {key: copy.deepcopy(self.bank).to(device=device, dtype=dtype).eval()}
        return self._placed[key]


@dataclass
class RunReport:
    """What one fused sampling run did, for the fusion inspector and the tests."""

    layers: list = field(default_factory=list)
    strength: dict = field(default_factory=dict)      # receiver layer -> mean strength over fusing calls
    k_change: dict = field(default_factory=dict)      # receiver layer -> mean relative K change (token subsample)
    v_change: dict = field(default_factory=dict)
    gate: dict = field(default_factory=dict)          # receiver layer -> {"k": g, "v": g} (data-independent part)
    sharer_forwards: int = 0
    model_calls: int = 0
    peak_kv_bytes: int = 0                            # most sharer K/V held at once (live sources)
    copied_kv_bytes: int = 0                          # sharer K/V copied to match the receiver's chunks
    cached_kv_bytes: int = 0                          # most projected sharer K/V kept for reuse (sharer_part)
    refresh: dict = field(default_factory=dict)       # the refresh tracker's report: steps that ran the sharer, saved
    nonfinite_layers: list = field(default_factory=list)   # layers whose fused K/V held inf/nan

    def to_json(self) -> dict:
        """Strict JSON (NaN/Inf become null): browsers' JSON.parse refuses NaN."""
        return strict_json({"layers": self.layers, "strength": self.strength, "k_change": self.k_change,
                "v_change": self.v_change, "gate": self.gate, "sharer_forwards": self.sharer_forwards,
                "model_calls": self.model_calls, "peak_kv_bytes": self.peak_kv_bytes,
                "copied_kv_bytes": self.copied_kv_bytes, "cached_kv_bytes": self.cached_kv_bytes,
                "refresh": self.refresh,
                "nonfinite_layers": self.nonfinite_layers})


class LayerBlend:
    """One fused receiver layer's blend in this call: the projectors' receiver side (``merge``) and the blend at the
    call's strength, with the layer's statistics and finite flag. :meth:`FusionRun.layer_blend` hands it out.

    It holds everything the blend reads (the layer's two projectors, its strength, its statistics row and flag), so
    the blend looks nothing up by layer: a compiled receiver traces this one function once for every fused layer
    (dynamo keeps 8 variants of a function; a real model fuses 30-40 layers). The strength is also kept as a 0-d
    CPU tensor, ``weight``: where torch.compile traces, the blend reads that, a graph input, so a strength that
    changes every call (a ramp) is no recompile; eager code blends with the Python float, exactly as before.
    """

    def __init__(self, k_projector, v_projector, heads: int, head_dim: int, finite: Tensor,
                 change: Optional[Tensor], stride: int):
        self.k_projector, self.v_projector = k_projector, v_projector
        self.heads, self.head_dim = heads, head_dim
        self.strength = 0.0
        self.weight = torch.zeros((), dtype=torch.float64)
        self.finite = finite            # 0-d bool on the device (health.FiniteWatch)
        self.change = change            # (2,) K and V change sums on the device, or None without statistics
        self.stride = stride

    def set_strength(self, strength: float) -> None:
        self.strength = strength
        self.weight.fill_(strength)

    def __call__(self, k: Tensor, v: Tensor, pk, pv) -> tuple[Tensor, Tensor]:
        """Receiver ``k, v`` ((B, N, H*D) or (B, N, H, D)) fused with ``sharer_part``'s ``pk, pv``; the receiver's layout."""
        k4 = k.reshape(*k.shape[:2], self.heads, self.head_dim)
        v4 = v.reshape(*v.shape[:2], self.heads, self.head_dim)
        mk, mv = self.k_projector.merge(pk, k4), self.v_projector.merge(pv, v4)
        if torch.compiler.is_compiling():
            k2, v2 = lerp(mk, k4, self.weight), lerp(mv, v4, self.weight)
        else:       # into the projector's output, not a new K/V (fusion.fuse decides when it may)
            k2 = fuse(mk, k4, self.strength, inplace=True, protect=(pk,))
            v2 = fuse(mv, v4, self.strength, inplace=True, protect=(pv,))
        if self.change is not None:
            self._measure(k4, k2, v4, v2)
        note_finite(self.finite, k2, v2)
        return k2.reshape(k.shape), v2.reshape(v.shape)

    def _measure(self, k, k2, v, v2):
        """Add this call's relative K and V change (every ``stride``-th token) to the layer's row: K and V measured
        together (one stack, one difference, two norms), nothing read back until :meth:`FusionRun.close`."""
        s = self.stride
        with torch.no_grad():
            if k.shape == v.shape:
                before = torch.stack((k[:, ::s], v[:, ::s])).float()
                after = torch.stack((k2[:, ::s], v2[:, ::s])).float()
                dims = tuple(range(1, before.dim()))
                ratio = (torch.linalg.vector_norm(after.sub_(before), dim=dims)
                         / torch.linalg.vector_norm(before, dim=dims).clamp_min(1e-12))
            else:
                ratio = torch.stack([torch.linalg.vector_norm(a[:, ::s].float() - b[:, ::s].float())
                                     / torch.linalg.vector_norm(b[:, ::s].float()).clamp_min(1e-12)
                                     for b, a in ((k, k2), (v, v2))])
            self.change.add_(ratio.to(self.change.device))


class FusionRun:
    """One sampling run's fusion state: per-call strengths, alignment, projection, statistics.

    bundle: a ProjectorBundle (bank, layer_map, sharer/receiver signatures).
    strength: the user's global strength; ``layer_strengths`` overrides the layer map's per-layer
        factors ({receiver layer: factor}); the effective strength of a layer in a call is
        ``schedule.strength_at(percent, strength * factor)``.
    align: for pairs other than Wan (text encoders), the host's alignment ``(sk, sv) -> (sk, sv)`` onto the
        receiver's tokens (c2c_core.tokens.build_text_alignment: gather + M-RoPE re-rotation); then the
        grid and RoPE keywords below are not given.
    sharer_rope / receiver_rope, sharer_grid / receiver_grid: where the two models' tokens sit. With
        ``rope_alignment="auto"`` sharer keys are re-rotated to the receiver's positions; ``"off"``
        treats the sharer's keys as if made at the receiver's positions. Different grids are
        resampled (``grid_mode`` nearest or trilinear) with keys un-rotated first.
    device, dtype: where the receiver computes; the projector bank is placed there (``banks``
        caches the placed copy across runs).
    stats: measure the relative K/V change per layer for the report (the fusion inspector's bars).
        On by default; a host that shows no report (projector training) passes False and the per-layer
        path then does no work beyond the fusion itself (``k_change``/``v_change`` stay empty).
    """

    STATS_TOKEN_STRIDE = 16   # measure K/V change on every 16th token: cheap, and enough for a plot

    def __init__(self, bundle, schedule: FusionSchedule, strength: float,
                 layer_strengths: Optional[Mapping[int, float]] = None, *,
                 sharer_rope: RopeSpec = RopeSpec(), receiver_rope: RopeSpec = RopeSpec(),
                 sharer_grid: Optional[TokenGrid] = None, receiver_grid: Optional[TokenGrid] = None,
                 rope_alignment: str = "auto", grid_mode: str = "nearest", device=None, dtype=None,
                 banks: Optional[BankCache] = None, stats: bool = True,
                 align: Optional[Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]] = None):
        self.bundle = bundle
        self.schedule = schedule
        self.layer_map = bundle.layer_map
        self.layers = sorted(self.layer_map.pairs)
        overrides = dict(layer_strengths or {})
        self._base = {layer: float(strength) * overrides.get(layer, self.layer_map.strength(layer))
                      for layer in self.layers}
        check_fusion(bundle.bank, self.layer_map, float(strength))   # a map that fits the bank, a strength >= 0
        self.sharer_rope, self.receiver_rope = sharer_rope, receiver_rope
        self.sharer_grid, self.receiver_grid = sharer_grid, receiver_grid
        self.rope_alignment = rope_alignment
        self.grid_mode = grid_mode
        grids = (sharer_grid is not None) + (receiver_grid is not None)
        if (align is None and grids != 2) or (align is not None and grids):
            raise FusionError("FusionRun: pass either sharer_grid and receiver_grid (a Wan pair: the alignment is built "
                              "from grids and RoPE specs) or align= (a text-encoder pair: c2c_core.tokens."
                              "build_text_alignment), not both; got " + ("align= and a grid." if align is not None
                                                                         else f"{grids} grid(s) and no align=."))
        self._host_align = align
        self._banks = banks if banks is not None else BankCache(bundle.bank)
        self._device, self._dtype, self._bank = device, dtype, None
        self._align = None
        self._strengths = {layer: 0.0 for layer in self.layers}
        self.active = False
        self.percent = 0.0
        self._calls = 0
        self._active_calls = 0
        self._strength_sum = {layer: 0.0 for layer in self.layers}
        self._finite = FiniteWatch()           # NaN/Inf in fused K/V: device flags, read once in close()
        self.stats = bool(stats)
        self._row = {layer: i for i, layer in enumerate(self.layers)}
        self._change: Optional[Tensor] = None  # (layers, 2) sums of K and V change, on the device, read in close()
        self._measured = {layer: 0 for layer in self.layers}
        self._parts: dict = {}                 # (receiver layer, branches) -> (window, pk, pv): sharer_part's cache
        self._blends: dict = {}                # receiver layer -> LayerBlend, made at the layer's first blend
        self._cached_bytes = 0
        self._peak_cached_bytes = 0

    @property
    def bank(self) -> ProjectorBank:
        """The bank on the receiver's device, placed at first use rather than when the run is set up: a host
        may load the bank's module to the device in between (ComfyUI loads a registered bank with the
        receiver after OUTER_SAMPLE), and placing it early would keep a second, unmanaged copy there."""
        if self._bank is None:
            self._bank = self._banks.on(self._device, self._dtype)
        return self._bank

    # -- per model call ---------------------------------------------------------------------------
    def begin_call(self, percent: float) -> bool:
        """Set this call's per-layer strengths at ``percent`` through the noise schedule.

        Returns True when any layer fuses in this call (the host fetches sharer K/V only then).
        """
        self._calls += 1
        self.percent = float(percent)
        self._strengths = {layer: self.schedule.strength_at(self.percent, base) for layer, base in self._base.items()}
        self.active = any(s != 0.0 for s in self._strengths.values())
        if self.active:
            self._active_calls += 1
            for layer, s in self._strengths.items():
                self._strength_sum[layer] += s
        return self.active

    @property
    def calls(self) -> int:
        """Model calls begun so far in this run."""
        return self._calls

    def strength(self, layer: int) -> float:
        """This call's strength of receiver ``layer`` (a Python float; 0.0 outside the window)."""
        return self._strengths.get(layer, 0.0)

    def sharer_layer(self, layer: int) -> int:
        return self.layer_map.pairs[layer]

    # -- per fused layer --------------------------------------------------------------------------
    # The fuse tail is split in two so a reused sharer K/V costs only the blend: ``sharer_part`` (alignment and the
    # projector's sharer side, cached per layer and branches while the refresh window holds) and ``blend`` (the projector's
    # receiver side and the blend at this call's strength). ``blend`` is what a compiled receiver traces.
    def sharer_part(self, layer: int, sk: Tensor, sv: Tensor, key: Hashable = None, *,
                    like: Optional[Tensor] = None) -> tuple:
        """Sharer K/V of receiver ``layer`` made ready for :meth:`blend`: cast to ``like``'s device and dtype (default:
        the run's), aligned to the receiver's grid and RoPE positions, and put through each projector's
        ``sharer_part``. Layout as the host hands them, (B, N, H*D) or (B, N, H, D). With a ``key`` (the call's
        refresh window and branches) the result is kept per layer and branches and returned again while the
        window is the same (:meth:`cached_part`): the sharer's K/V were reused, so nothing that depends only on them is recomputed. ``key=None``: no cache."""
        self._fused(layer, "sharer_part")
        cached = self.cached_part(layer, key)
        if cached is not None:
            return cached
        src = self.bundle.sharer
        sk = sk.reshape(*sk.shape[:2], src.num_heads, src.head_dim)
        sv = sv.reshape(*sv.shape[:2], src.num_heads, src.head_dim)
        pk, pv = self._sharer_part(layer, sk, sv, *self._target(like))
        if key is not None:
            window, branches = key
            old = self._parts.get((layer, branches))
            self._cached_bytes += _nbytes(pk, pv) - (_nbytes(old[1], old[2]) if old is not None else 0)
            self._peak_cached_bytes = max(self._peak_cached_bytes, self._cached_bytes)
            self._parts[(layer, branches)] = (window, pk, pv)
        return pk, pv

    def cached_part(self, layer: int, key: Hashable = None) -> Optional[tuple]:
        """What :meth:`sharer_part` kept for ``layer`` under ``key`` (the call's refresh window and branches), or None.
        Kept per layer and branches, so hosts that call the model once per CFG branch (diffusers) keep each branch's;
        a host asks first, so a call that reuses the sharer's K/V does not even fetch them from its source."""
        if key is None:
            return None
        window, branches = key
        cached = self._parts.get((layer, branches))
        return (cached[1], cached[2]) if cached is not None and cached[0] == window else None

    def blend(self, layer: int, k: Tensor, v: Tensor, pk: Tensor, pv: Tensor) -> tuple[Tensor, Tensor]:
        """Receiver ``k, v`` ((B, N, H*D) or (B, N, H, D)) fused with :meth:`sharer_part`'s ``pk, pv`` at this call's
        strength; returned in the receiver's own layout. Strength 0 returns ``k, v`` themselves."""
        blend = self.layer_blend(layer, k.device)
        if blend is None:
            return k, v
        return blend(k, v, pk, pv)

    def layer_blend(self, layer: int, device) -> Optional[LayerBlend]:
        """This call's :class:`LayerBlend` of receiver ``layer`` (what :meth:`blend` runs), or None when the layer does
        not fuse in this call (strength 0). A compiled host calls this where it decides, outside the traced code, and
        runs the blend in it (docs/compile.md)."""
        s = self._fused(layer, "blend")
        if s == 0.0:
            return None
        blend = self._blends.get(layer)
        if blend is None:
            change = None
            if self.stats:
                if self._change is None:
                    self._change = torch.zeros(len(self.layers), 2, device=device, dtype=torch.float32)
                change = self._change[self._row[layer]]
            dst, bank = self.bundle.receiver, self.bank
            blend = self._blends[layer] = LayerBlend(bank.projector(layer, "k"), bank.projector(layer, "v"),
                                                     dst.num_heads, dst.head_dim, self._finite.flag(layer, device),
                                                     change, self.STATS_TOKEN_STRIDE)
        blend.set_strength(s)
        if self.stats:
            self._measured[layer] += 1
        return blend

    def fuse_tokens(self, layer: int, k: Tensor, v: Tensor, sk: Tensor, sv: Tensor,
                    key: Hashable = None) -> tuple[Tensor, Tensor]:
        """``blend(sharer_part(...))`` for K/V as a host's attention hands them over, (B, N, H*D) or (B, N, H, D)
        each; returned in the receiver's own layout. Strength 0 returns ``k, v`` without touching the sharer's."""
        if self._fused(layer, "fuse_tokens") == 0.0:
            return k, v
        pk, pv = self.sharer_part(layer, sk, sv, key, like=k)
        return self.blend(layer, k, v, pk, pv)

    def fuse(self, layer: int, k: Tensor, v: Tensor, sk: Tensor, sv: Tensor) -> tuple[Tensor, Tensor]:
        """Fuse sharer ``sk, sv`` (B, N_s, Hs, Ds) into receiver ``k, v`` (B, N, Ht, Dt); returns (k', v').

        Sharer tensors are cast to the receiver's device and dtype, brought onto its grid and RoPE
        positions, projected and blended at this call's strength. Strength 0 returns ``k, v``
        themselves without touching the sharer's.
        """
        blend = self.layer_blend(layer, k.device)
        if blend is None:
            return k, v
        pk, pv = self._sharer_part(layer, sk, sv, k.device, k.dtype)
        return blend(k, v, pk, pv)

    def _fused(self, layer: int, what: str) -> float:
        s = self._strengths.get(layer)
        if s is None:
            raise FusionError(f"FusionRun.{what}: receiver layer {layer} is not fused; fused layers are {self.layers}.")
        return s

    def _target(self, like: Optional[Tensor]):
        if like is not None:
            return like.device, like.dtype
        return self._device, self._dtype

    def _sharer_part(self, layer, sk, sv, device, dtype):
        """(B, N_s, Hs, Ds) sharer K/V -> cast, aligned, and through the projectors' sharer side."""
        sk = sk.to(device=device, dtype=dtype)
        sv = sv.to(device=device, dtype=dtype)
        if self._align is None:
            self._align = self._build_alignment()
        sk, sv = self._align(sk, sv)
        bank = self.bank
        return bank.projector(layer, "k").sharer_part(sk), bank.projector(layer, "v").sharer_part(sv)

    def align(self, sk: Tensor, sv: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        """Sharer ``sk, sv`` as :meth:`fuse` projects them: on ``like``'s device/dtype, the receiver's grid
        and RoPE positions (training's K/V loss compares projections against these)."""
        if self._align is None:
            self._align = self._build_alignment()
        return self._align(sk.to(device=like.device, dtype=like.dtype), sv.to(device=like.device, dtype=like.dtype))

    def _build_alignment(self):
        """The run's alignment, with its RoPE tables built once (nothing is rebuilt per layer or call); a host's
        ``align=`` (text-encoder pairs) is used as it is."""
        if self._host_align is not None:
            return self._host_align
        src_rope = self.sharer_rope if self.rope_alignment == "auto" else self.receiver_rope
        dst_rope = self.receiver_rope
        if src_rope.theta != dst_rope.theta:
            raise KVShapeError(f"FusionRun: RoPE theta {src_rope.theta} vs {dst_rope.theta}; expected equal (Wan uses 10000).")
        head_dim = self.bundle.sharer.head_dim
        src, dst = self.sharer_grid, self.receiver_grid
        if src == dst:
            rerotation = RopeRerotation(src_rope.positions(src), dst_rope.positions(dst), head_dim, src_rope.theta)
            return lambda sk, sv: (rerotation.apply(sk), sv)
        src_pos, dst_pos = src_rope.positions(src), dst_rope.positions(dst)
        unrotate = RopeRerotation(src_pos, torch.zeros_like(src_pos), head_dim, src_rope.theta)
        rotate = RopeRerotation(torch.zeros_like(dst_pos), dst_pos, head_dim, dst_rope.theta)
        mode = self.grid_mode

        def align(sk, sv):
            # rotated keys must not be interpolated (phases would mix): un-rotate, resample, rotate
            plain = resample_tokens(unrotate.apply(sk), src, dst, mode)
            return rotate.apply(plain), resample_tokens(sv, src, dst, mode)
        return align

    # -- end of run -------------------------------------------------------------------------------
    def close(self, source: SourceReport = SourceReport(), refresh: Optional[Mapping] = None) -> RunReport:
        """The run's report, with what the K/V source did and what the host's refresh tracker decided
        (``RefreshReport.to_json()``); the only place device tensors are read back. Drops sharer_part's cache."""
        r = RunReport(layers=list(self.layers), model_calls=self._calls, sharer_forwards=int(source.sharer_forwards),
                      peak_kv_bytes=int(source.peak_kv_bytes), copied_kv_bytes=int(source.copied_kv_bytes),
                      cached_kv_bytes=self._peak_cached_bytes, refresh=dict(refresh or {}))
        self._parts.clear()
        self._cached_bytes = 0
        sums = self._change.tolist() if self._change is not None else [[0.0, 0.0]] * len(self.layers)
        for layer, (k_sum, v_sum) in zip(self.layers, sums):
            if self.stats:
                n = self._measured[layer]
                r.k_change[layer] = k_sum / n if n else 0.0
                r.v_change[layer] = v_sum / n if n else 0.0
            r.strength[layer] = self._strength_sum[layer] / self._active_calls if self._active_calls else 0.0
            r.gate[layer] = {which: static_gate(self.bundle.bank.projector(layer, which)) for which in ("k", "v")}
            if not (math.isfinite(k_sum) and math.isfinite(v_sum)):
                r.nonfinite_layers.append(layer)
        r.nonfinite_layers = sorted(set(r.nonfinite_layers) | set(self._finite.bad_layers()))
        return r
