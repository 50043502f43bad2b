"""Projectors: map one layer's sharer K (or V) into the receiver's space and merge it in.

Contract shared by every kind (pinned by tests/core/test_projectors.py)::

    forward(sharer: (B, N, Hs, Ds), receiver: (B, N, Ht, Dt)) -> (B, N, Ht, Dt), receiver's dtype

A projector computes in its parameters' dtype (inputs are cast) and returns the receiver's dtype,
so a bank kept in float32 can serve a bf16 model. Kinds without parameters compute in the
receiver's dtype. The output already contains the merge with the receiver (a residual or a gate);
the global fusion strength is applied afterwards by :mod:`.fusion`.

Where the C2C recipe says "concatenate sharer and receiver, then Linear", the learned kinds use two
Linears whose outputs are added: the same function, without allocating the (B, N, Ws + Wt) concat
(memory the hot path cannot spare). Their state-dict names are ``in_sharer.*`` and ``in_receiver.*``.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn

from .errors import KVShapeError, MissingLayerError, ProjectorConfigError, UnknownProjectorError
from .signature import ModelSignature

__all__ = [
    "Projector",
    "PROJECTORS",
    "PROJECTOR_KINDS",
    "register_projector",
    "build_projector",
    "static_gate",
    "resolve_kind",
    "known_kinds",
    "ProjectorBank",
    "IdentityProjector",
    "WeightedProjector",
    "GatingProjector",
    "FullProjector",
    "C2CProjector",
    "c2c_default_hidden",
    "ProjectorConfigError",
    "UnknownProjectorError",
]

#: kind name -> factory ``f(sharer: ModelSignature, receiver: ModelSignature, **hparams) -> Projector``.
#: Concrete kinds register their class; "auto" registers a function that picks a class.
PROJECTORS: dict[str, Callable[..., "Projector"]] = {}

GATING_GRANULARITIES = ("head", "token", "value")


def register_projector(name: str):
    """Class/function decorator adding a projector kind to :data:`PROJECTORS` under ``name``."""

    def decorate(factory):
        if name in PROJECTORS:
            raise ProjectorConfigError(f"projector kind {name!r} is registered twice; pick another name.")
        PROJECTORS[name] = factory
        if isinstance(factory, type):
            factory.kind = name
        return factory

    return decorate


def known_kinds() -> list[str]:
    return sorted(PROJECTORS)


# ----------------------------------------------------------------------------------------------
# hyper-parameter checks: one message style for every kind


def _float_hparam(kind: str, name: str, value: Any, lo: float, hi: float, open_ends: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = lo < value < hi if open_ends else lo <= value <= hi
    if not ok:
        interval = f"({lo}, {hi})" if open_ends else f"[{lo}, {hi}]"
        raise ProjectorConfigError(
            f"projector {kind!r}: {name}={value!r}; expected a number in {interval}."
        )
    return float(value)


def _int_hparam(kind: str, name: str, value: Any, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ProjectorConfigError(f"projector {kind!r}: {name}={value!r}; expected an integer >= {lo}.")
    return value


def _bool_hparam(kind: str, name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ProjectorConfigError(f"projector {kind!r}: {name}={value!r}; expected true or false.")
    return value


def _logit(p: float) -> float:
    return math.log(p) - math.log1p(-p)


def _require_same_shape(kind: str, sharer: ModelSignature, receiver: ModelSignature) -> None:
    if (sharer.num_heads, sharer.head_dim) != (receiver.num_heads, receiver.head_dim):
        raise ProjectorConfigError(
            f"projector {kind!r} needs equal attention shapes; sharer {sharer.name or 'model'} has "
            f"{sharer.num_heads} heads x {sharer.head_dim}, receiver {receiver.name or 'model'} has "
            f"{receiver.num_heads} x {receiver.head_dim}. Use 'full' or 'c2c' (or 'auto') for "
            f"models of different widths."
        )


def _flat(x: Tensor) -> Tensor:
    """(B, N, H, D) -> (B, N, H*D); a view when the layout allows, a copy otherwise."""
    return x.reshape(x.shape[0], x.shape[1], x.shape[2] * x.shape[3])


class Projector(nn.Module):
    """Base class: checks shapes, then calls :meth:`_forward` with validated tensors.

    ``hparams`` holds the JSON-serialisable constructor keyword arguments (defaults included),
    which is what a bundle stores to rebuild the projector.
    """

    kind: str = ""

    def __init__(self, sharer: ModelSignature, receiver: ModelSignature, hparams: dict):
        super().__init__()
        self.sharer_signature = sharer
        self.receiver_signature = receiver
        self.hparams = dict(hparams)

    def forward(self, sharer: Tensor, receiver: Tensor) -> Tensor:
        """sharer (B, N, Hs, Ds), receiver (B, N, Ht, Dt) -> (B, N, Ht, Dt) in receiver dtype."""
        self._check(sharer, receiver)
        return self._forward(sharer, receiver)

    def _forward(self, sharer: Tensor, receiver: Tensor) -> Tensor:
        raise NotImplementedError

    # The sharer side, split off so a reused sharer K/V is projected once (FusionRun.sharer_part caches it):
    # ``forward(s, r) == merge(sharer_part(s), r)`` bit for bit. A kind whose sharer side does not separate keeps
    # these defaults: the sharer comes back unchanged and ``merge`` runs the whole forward.
    def sharer_part(self, sharer: Tensor):
        """What depends only on the sharer (B, N, Hs, Ds); this default: the sharer itself."""
        return sharer

    def merge(self, part, receiver: Tensor) -> Tensor:
        """The output of ``forward`` from :meth:`sharer_part`'s ``part`` and the receiver (B, N, Ht, Dt)."""
        return self(part, receiver)

    def _check_sharer(self, sharer: Tensor) -> None:
        s = self.sharer_signature
        if sharer.dim() != 4 or tuple(sharer.shape[2:]) != (s.num_heads, s.head_dim):
            raise KVShapeError(
                f"{self.kind} projector: sharer has shape {tuple(sharer.shape)}; expected (B, N, {s.num_heads}, "
                f"{s.head_dim}) from the sharer signature."
            )

    def _check_part(self, part: Tensor, receiver: Tensor, width: int) -> None:
        r = self.receiver_signature
        if receiver.dim() != 4 or tuple(receiver.shape[2:]) != (r.num_heads, r.head_dim):
            raise KVShapeError(
                f"{self.kind} projector: receiver has shape {tuple(receiver.shape)}; expected (B, N, {r.num_heads}, "
                f"{r.head_dim}) from the receiver signature."
            )
        if tuple(part.shape[:2]) != tuple(receiver.shape[:2]) or part.shape[-1] != width:
            raise KVShapeError(
                f"{self.kind} projector: sharer part {tuple(part.shape)} does not fit receiver {tuple(receiver.shape)}; "
                f"expected (B, N) equal and a last dimension of {width}. Resample the sharer's tokens "
                f"(align.resample_tokens) or match the CFG chunk."
            )

    def reset_state(self) -> None:
        """Re-initialise non-persistent buffers (after ``to_empty``); no-op for most kinds."""

    def _check(self, sharer: Tensor, receiver: Tensor) -> None:
        s, r = self.sharer_signature, self.receiver_signature
        if sharer.dim() != 4 or receiver.dim() != 4:
            raise KVShapeError(
                f"{self.kind} projector got sharer {tuple(sharer.shape)} and receiver "
                f"{tuple(receiver.shape)}; expected 4-D (B, N, H, D). Use to_heads() on (B, N, H*D)."
            )
        if sharer.shape[:2] != receiver.shape[:2]:
            raise KVShapeError(
                f"{self.kind} projector: sharer has (B, N)={tuple(sharer.shape[:2])}, receiver "
                f"{tuple(receiver.shape[:2])}; expected equal. Resample the sharer's tokens "
                f"(align.resample_tokens) or match the CFG chunk."
            )
        if tuple(sharer.shape[2:]) != (s.num_heads, s.head_dim):
            raise KVShapeError(
                f"{self.kind} projector: sharer has (H, D)={tuple(sharer.shape[2:])}; expected "
                f"({s.num_heads}, {s.head_dim}) from the sharer signature."
            )
        if tuple(receiver.shape[2:]) != (r.num_heads, r.head_dim):
            raise KVShapeError(
                f"{self.kind} projector: receiver has (H, D)={tuple(receiver.shape[2:])}; expected "
                f"({r.num_heads}, {r.head_dim}) from the receiver signature."
            )

    def _compute_dtype(self, receiver: Tensor) -> torch.dtype:
        for p in self.parameters():
            return p.dtype
        return receiver.dtype

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.hparams.items())


@register_projector("identity")
class IdentityProjector(Projector):
    """Training-free: the sharer's tensor replaces the receiver's (needs equal shapes)."""

    def __init__(self, sharer: ModelSignature, receiver: ModelSignature):
        _require_same_shape("identity", sharer, receiver)
        super().__init__(sharer, receiver, {})

    def _forward(self, sharer: Tensor, receiver: Tensor) -> Tensor:
        return sharer.to(receiver.dtype)

    def sharer_part(self, sharer: Tensor) -> Tensor:
        self._check_sharer(sharer)
        return sharer

    def merge(self, part: Tensor, receiver: Tensor) -> Tensor:
        self._check(part, receiver)
        return part.to(receiver.dtype)


@register_projector("weighted")
class WeightedProjector(Projector):
    """Training-free blend ``alpha * sharer + (1 - alpha) * receiver``; alpha may be learned.

    A learnable alpha is stored as a logit so it stays inside (0, 1) while training.
    """

    def __init__(self, sharer: ModelSignature, receiver: ModelSignature, *, alpha: float = 0.5, learnable: bool = False):
        _require_same_shape("weighted", sharer, receiver)
        learnable = _bool_hparam("weighted", "learnable", learnable)
        alpha = _float_hparam("weighted", "alpha", alpha, 0.0, 1.0, open_ends=learnable)
        super().__init__(sharer, receiver, {"alpha": alpha, "learnable": learnable})
        self.alpha = alpha
        if learnable:
            self.alpha_logit = nn.Parameter(torch.tensor(_logit(alpha), dtype=torch.float32))

    def _forward(self, sharer: Tensor, receiver: Tensor) -> Tensor:
        if not self.hparams["learnable"]:
            return torch.lerp(receiver, sharer.to(receiver.dtype), self.alpha)
        dtype = self.alpha_logit.dtype
        weight = torch.sigmoid(self.alpha_logit)
        return torch.lerp(receiver.to(dtype), sharer.to(dtype), weight).to(receiver.dtype)

    def sharer_part(self, sharer: Tensor) -> Tensor:
        """Nothing to precompute but the alignment: the blend needs the receiver."""
        self._check_sharer(sharer)
        return sharer

    def merge(self, part: Tensor, receiver: Tensor) -> Tensor:
        self._check(part, receiver)
        return self._forward(part, receiver)


@register_projector("gating")
class GatingProjector(Projector):
    """Learned gate g in [0, 1] from both inputs; output ``receiver + g * (sharer - receiver)``.

    Gate shapes by granularity: head (B, 1, H, 1) from token-pooled features, token (B, N, 1, 1),
    value (B, N, H, D). The gate's last Linear starts at zero weight and bias logit(gate_init), so a
    fresh projector gates every input by exactly ``gate_init``.
    """

    def __init__(
        self,
        sharer: ModelSignature,
        receiver: ModelSignature,
        *,
        granularity: str = "head",
        hidden_dim: int = 64,
        gate_init: float = 0.5,
    ):
        _require_same_shape("gating", sharer, receiver)
        if granularity not in GATING_GRANULARITIES:
            raise ProjectorConfigError(
                f"projector 'gating': granularity={granularity!r}; expected one of {GATING_GRANULARITIES}."
            )
        hidden_dim = _int_hparam("gating", "hidden_dim", hidden_dim, 1)
        gate_init = _float_hparam("gating", "gate_init", gate_init, 0.0, 1.0, open_ends=True)
        super().__init__(sharer, receiver, {"granularity": granularity, "hidden_dim": hidden_dim, "gate_init": gate_init})
        heads, dim = receiver.num_heads, receiver.head_dim
        width_in = heads * dim if granularity == "token" else dim
        width_out = dim if granularity == "value" else 1
        self.in_sharer = nn.Linear(width_in, hidden_dim)
        self.in_receiver = nn.Linear(width_in, hidden_dim, bias=False)
        self.act = nn.GELU()
        self.out = nn.Linear(hidden_dim, width_out)
        with torch.no_grad():
            self.out.weight.zero_()
            self.out.bias.fill_(_logit(gate_init))

    def gate(self, sharer: Tensor, receiver: Tensor) -> Tensor:
        """Gate in [0, 1], shaped to broadcast against (B, N, H, D); inputs in compute dtype."""
        granularity = self.hparams["granularity"]
        if granularity == "head":
            sharer, receiver = sharer.mean(dim=1, keepdim=True), receiver.mean(dim=1, keepdim=True)
        elif granularity == "token":
            sharer, receiver = _flat(sharer), _flat(receiver)
        logits = self.out(self.act(self.in_sharer(sharer) + self.in_receiver(receiver)))
        if granularity == "token":
            logits = logits.unsqueeze(-1)
        return torch.sigmoid(logits)

    def _forward(self, sharer: Tensor, receiver: Tensor) -> Tensor:
        dtype = self._compute_dtype(receiver)
        s, r = sharer.to(dtype), receiver.to(dtype)
        return torch.lerp(r, s, self.gate(s, r)).to(receiver.dtype)


@register_projector("full")
class FullProjector(Projector):
    """MLP from the sharer's flattened heads to the receiver's, added through a per-head gate.

    ``receiver + sigmoid(gate_logit)[h] * MLP(sharer)``; works for any pair of shapes. The MLP has
    ``num_layers`` Linears (GELU between them); gate_init sets sigmoid(gate_logit) at start.
    """

    def __init__(
        self,
        sharer: ModelSignature,
        receiver: ModelSignature,
        *,
        hidden_dim: int = 512,
        num_layers: int = 2,
        gate_init: float = 0.5,
    ):
        hidden_dim = _int_hparam("full", "hidden_dim", hidden_dim, 1)
        num_layers = _int_hparam("full", "num_layers", num_layers, 1)
        gate_init = _float_hparam("full", "gate_init", gate_init, 0.0, 1.0, open_ends=True)
        super().__init__(sharer, receiver, {"hidden_dim": hidden_dim, "num_layers": num_layers, "gate_init": gate_init})
        widths = [sharer.width] + [hidden_dim] * (num_layers - 1) + [receiver.width]
        layers: list[nn.Module] = []
        for i in range(num_layers):
            if i:
                layers.append(nn.GELU())
            layers.append(nn.Linear(widths[i], widths[i + 1]))
        self.mlp = nn.Sequential(*layers)
        self.gate_logit = nn.Parameter(torch.full((receiver.num_heads,), _logit(gate_init)))

    def _forward(self, sharer: Tensor, receiver: Tensor) -> Tensor:
        return self._merge(self._sharer_side(sharer), receiver)

    def _sharer_side(self, sharer: Tensor) -> Tensor:
        return self.mlp(_flat(sharer).to(self._compute_dtype(sharer)))

    def _merge(self, part: Tensor, receiver: Tensor) -> Tensor:
        dtype = self._compute_dtype(receiver)
        b, n, heads, dim = receiver.shape
        proj = part.view(b, n, heads, dim)
        gate = torch.sigmoid(self.gate_logit).view(1, 1, heads, 1)
        return (receiver.to(dtype) + gate * proj).to(receiver.dtype)

    def sharer_part(self, sharer: Tensor) -> Tensor:
        """The MLP of the sharer's flattened heads (B, N, Ht*Dt), in the projector's dtype."""
        self._check_sharer(sharer)
        return self._sharer_side(sharer)

    def merge(self, part: Tensor, receiver: Tensor) -> Tensor:
        self._check_part(part, receiver, self.receiver_signature.width)
        return self._merge(part, receiver)


class _ResidualFFN(nn.Module):
    """Pre-norm residual block of the C2C trunk: x + Linear(GELU(Linear(RMSNorm(x))))."""

    def __init__(self, width: int, eps: float):
        super().__init__()
        self.norm = nn.RMSNorm(width, eps=eps)
        self.fc1 = nn.Linear(width, width)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.fc2(self.act(self.fc1(self.norm(x))))


#: The c2c fuser's default hidden width h, from the receiver's K/V width W (heads x head_dim): W / 8, at least 64, at most
#: 512. Why it scales: a reused sharer K/V costs the cached in-projection nothing, but the rest of the fuser runs in every
#: fused call, per token and for K and V 2·(2·W·h + 4·h² + h·heads) multiply-adds (the receiver's in-projection, a
#: two-block trunk, the out-projection and head weights). A transformer block costs at least 6·W² (q, k, v, o, the
#: cross-attention's q and o) plus its FFN (2·W·ffn, ffn >= 2.7·W in Wan) and attention, so at h = W/8 the per-call part
#: is about 0.63·W² against >= 11·W²: <= 6 % of a block for W >= 512 (4.3 % at dim 1024 and 256 tokens, 1.0 % at
#: Wan2.1-1.3B 480p; below 512 the floor makes it more), where a fixed 512 was 28 % at dim 1024. The floor keeps a small
#: model's trunk able to learn; the ceiling keeps a 14B-class bank (W = 5,120) at the size the earlier fixed 512 gave it,
#: where the whole fuser (both parts) is 2.8 % of a block. An explicit ``hidden_dim`` (a bundle's hparams, Create C2C
#: Projector's widget) always wins. Numbers by shape: BENCHMARKS.md (benchmarks/bench_bridge.py ``c2c_standing``).
C2C_HIDDEN_FRACTION, C2C_HIDDEN_MIN, C2C_HIDDEN_MAX = 8, 64, 512


def c2c_default_hidden(receiver: ModelSignature) -> int:
    """The c2c fuser's hidden width when none is given: an eighth of ``receiver``'s K/V width, clamped to [64, 512]."""
    return min(C2C_HIDDEN_MAX, max(C2C_HIDDEN_MIN, receiver.width // C2C_HIDDEN_FRACTION))


@register_projector("c2c")
class C2CProjector(Projector):
    """The Cache-to-Cache fuser (Fu et al., C2C): ``receiver + gate * weight * proj``.

    Sharer and receiver (flattened heads) feed a Linear to ``hidden_dim``, a residual trunk of
    ``num_layers`` blocks, a final RMSNorm, then two branches: ``proj`` (B, N, Ht, Dt) and a
    per-head dynamic ``weight`` = sigmoid(...) of shape (B, N, Ht, 1). ``gate`` comes from one
    scalar logit: while training a Gumbel-sigmoid sample at temperature ``self.temperature`` (the
    trainer anneals it via :meth:`set_temperature`), at inference the hard gate ``logit > 0``.
    ``hidden_dim`` None (the default) is :func:`c2c_default_hidden` of the receiver; ``hparams`` keeps the
    width it resolved to, so a bundle rebuilds exactly this fuser whatever the default becomes.

    A closed gate returns the ``receiver`` object itself, untouched, without computing anything.
    The open/closed decision must not read the GPU per call (a host sync every layer), so it is a cached Python
    bool, refreshed when the logit is set (:meth:`set_gate_logit`), loaded (``load_state_dict``),
    converted to another dtype, on ``train()``/``eval()``, and whenever the parameter's autograd
    version counter moved (optimizer steps). Writes through ``.data`` bypass all of these; use
    :meth:`set_gate_logit` instead. A fresh fuser's logit is ``gate_init`` = +1.0: open.
    """

    def __init__(
        self,
        sharer: ModelSignature,
        receiver: ModelSignature,
        *,
        hidden_dim: int | None = None,
        num_layers: int = 2,
        gate_init: float = 1.0,
        eps: float = 1e-6,
    ):
        hidden_dim = c2c_default_hidden(receiver) if hidden_dim is None else _int_hparam("c2c", "hidden_dim", hidden_dim, 1)
        num_layers = _int_hparam("c2c", "num_layers", num_layers, 0)
        gate_init = _float_hparam("c2c", "gate_init", gate_init, -1e4, 1e4)
        eps = _float_hparam("c2c", "eps", eps, 0.0, 1.0, open_ends=True)
        super().__init__(
            sharer, receiver, {"hidden_dim": hidden_dim, "num_layers": num_layers, "gate_init": gate_init, "eps": eps}
        )
        self.in_sharer = nn.Linear(sharer.width, hidden_dim)
        self.in_receiver = nn.Linear(receiver.width, hidden_dim, bias=False)
        self.trunk = nn.ModuleList(_ResidualFFN(hidden_dim, eps) for _ in range(num_layers))
        self.out_norm = nn.RMSNorm(hidden_dim, eps=eps)
        self.proj = nn.Linear(hidden_dim, receiver.width)
        self.head_weight = nn.Linear(hidden_dim, receiver.num_heads)
        self.gate_logit = nn.Parameter(torch.tensor(gate_init, dtype=torch.float32))
        self.register_buffer("temperature", torch.tensor(1.0), persistent=False)
        self._gate_key: tuple = ()
        self._gate_is_open = gate_init > 0
        self._gate_key = self._current_gate_key()
        self.register_load_state_dict_post_hook(lambda module, incompatible: module._refresh_gate())

    # -- gate bookkeeping (Python side, no GPU reads per call) --------------------------------

    def _current_gate_key(self) -> tuple:
        p = self.gate_logit
        try:
            version = p._version
        except RuntimeError:  # inference-mode tensors track no version counter
            version = None
        return (id(p), p.data_ptr(), p.dtype, version)

    def _refresh_gate(self) -> None:
        if self.gate_logit.is_meta:
            return
        self._gate_is_open = bool(self.gate_logit.detach() > 0)
        self._gate_key = self._current_gate_key()

    @property
    def gate_open(self) -> bool:
        """Inference gate (logit > 0), from the cache unless the logit changed since. While torch.compile traces,
        the cache alone (the version check reads a storage pointer, which would break the graph; a compiled
        graph is guarded on the cached bool, and inference does not move the logit)."""
        if not torch.compiler.is_compiling() and self._gate_key != self._current_gate_key():
            self._refresh_gate()
        return self._gate_is_open

    def set_gate_logit(self, value: float) -> None:
        """Set the gate logit; > 0 opens the fuser at inference, <= 0 closes it."""
        value = _float_hparam("c2c", "gate logit", value, -1e4, 1e4)
        with torch.no_grad():
            self.gate_logit.fill_(value)
        self._gate_is_open = value > 0
        self._gate_key = self._current_gate_key()

    def set_temperature(self, tau: float) -> None:
        """Gumbel-sigmoid temperature used while training (annealed by the trainer)."""
        _float_hparam("c2c", "temperature", tau, 0.0, math.inf, open_ends=True)
        self.temperature.fill_(tau)

    def reset_state(self) -> None:
        self.temperature.fill_(1.0)
        self._refresh_gate()

    def train(self, mode: bool = True):
        result = super().train(mode)
        self._refresh_gate()
        return result

    def _apply(self, fn, recurse=True):
        was_open, dtype = self._gate_is_open, self.gate_logit.dtype
        result = super()._apply(fn, recurse)
        if self.gate_logit.dtype == dtype:  # device moves keep the value: no GPU read needed
            self._gate_is_open = was_open
            self._gate_key = self._current_gate_key()
        else:
            self._refresh_gate()
        return result

    # -- math ----------------------------------------------------------------------------------

    def _gumbel_gate(self) -> Tensor:
        """Gumbel-sigmoid sample of the gate, in float32 (bf16 cannot hold 1 - 1e-6)."""
        logit = self.gate_logit.float()
        u = torch.rand_like(logit).clamp_(1e-6, 1.0 - 1e-6)
        return torch.sigmoid((logit + torch.log(u) - torch.log1p(-u)) / self.temperature.float())

    def _forward(self, sharer: Tensor, receiver: Tensor) -> Tensor:
        if not self.training and not self.gate_open:
            return receiver
        return self._merge(self.in_sharer(_flat(sharer).to(self._compute_dtype(receiver))), receiver)

    def sharer_part(self, sharer: Tensor):
        """The ``in_sharer`` branch (B, N, hidden_dim) in the projector's dtype; a closed gate computes nothing and
        returns the sharer."""
        self._check_sharer(sharer)
        if not self.training and not self.gate_open:
            return sharer
        return self.in_sharer(_flat(sharer).to(self._compute_dtype(sharer)))

    def merge(self, part: Tensor, receiver: Tensor) -> Tensor:
        if not self.training and not self.gate_open:
            return receiver
        self._check_part(part, receiver, self.hparams["hidden_dim"])
        return self._merge(part, receiver)

    def _merge(self, part: Tensor, receiver: Tensor) -> Tensor:
        dtype = self._compute_dtype(receiver)
        b, n, heads, dim = receiver.shape
        r = receiver.to(dtype)
        h = part + self.in_receiver(_flat(r))
        for block in self.trunk:
            h = block(h)
        h = self.out_norm(h)
        proj = self.proj(h).view(b, n, heads, dim)
        weight = torch.sigmoid(self.head_weight(h)).unsqueeze(-1)
        delta = weight * proj
        if self.training:
            delta = self._gumbel_gate() * delta
        return (r + delta).to(receiver.dtype)


@register_projector("auto")
def auto_projector(sharer: ModelSignature, receiver: ModelSignature, **hparams) -> Projector:
    """Equal attention shapes -> 'gating' (head granularity); different shapes -> 'full'."""
    return build_projector(resolve_kind("auto", sharer, receiver), sharer, receiver, **hparams)


def resolve_kind(kind: str, sharer: ModelSignature, receiver: ModelSignature) -> str:
    """The concrete kind ``kind`` stands for ('auto' picks one; others map to themselves)."""
    if kind != "auto":
        return kind
    same = (sharer.num_heads, sharer.head_dim) == (receiver.num_heads, receiver.head_dim)
    return "gating" if same else "full"


def build_projector(kind: str, sharer: ModelSignature, receiver: ModelSignature, **hparams) -> Projector:
    """Build one projector; unknown kinds and bad hyper-parameters raise with the accepted values."""
    if not isinstance(kind, str) or kind not in PROJECTORS:
        raise UnknownProjectorError(
            f"unknown projector kind {kind!r}; known kinds: {', '.join(known_kinds())}. "
            f"Pick one of them (or update DiT Cache Bridge if the kind is newer)."
        )
    factory = PROJECTORS[kind]
    params = inspect.signature(factory).parameters.values()
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        accepted = [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]
        unknown = sorted(set(hparams) - set(accepted))
        if unknown:
            raise ProjectorConfigError(
                f"projector {kind!r} got unknown hyper-parameters {unknown}; accepted: "
                f"{accepted or 'none'}."
            )
    return factory(sharer, receiver, **hparams)


#: The built-in kinds in registration order (what a node offers); kinds registered later are in PROJECTORS only.
PROJECTOR_KINDS = tuple(PROJECTORS)


class ProjectorBank(nn.Module):
    """One projector per fused receiver layer, separately for K and V.

    State-dict names read ``k.<layer>.<param>`` and ``v.<layer>.<param>``, e.g.
    ``k.12.mlp.0.weight``; a bundle stores exactly these. Lookups go through plain tables keyed by the int
    layer (the same modules): a compiled receiver traces them without turning the layer into a string.
    """

    def __init__(
        self,
        kind: str,
        sharer: ModelSignature,
        receiver: ModelSignature,
        layers: Iterable[int],
        **hparams,
    ):
        super().__init__()
        requested = list(layers)
        bad = [i for i in requested if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < receiver.num_layers]
        if bad or not requested:
            raise ProjectorConfigError(
                f"ProjectorBank layers {bad or requested} are invalid; expected "
                f"a non-empty set of receiver layer indices in 0..{receiver.num_layers - 1}."
            )
        layer_list = sorted(set(requested))
        concrete = resolve_kind(kind, sharer, receiver)
        self.kind = concrete
        self.sharer = sharer
        self.receiver = receiver
        self.layers = layer_list
        self.k = nn.ModuleDict({str(i): build_projector(concrete, sharer, receiver, **hparams) for i in layer_list})
        self.v = nn.ModuleDict({str(i): build_projector(concrete, sharer, receiver, **hparams) for i in layer_list})
        self.hparams = dict(self.k[str(layer_list[0])].hparams)
        self._by_layer = {"k": {i: self.k[str(i)] for i in layer_list}, "v": {i: self.v[str(i)] for i in layer_list}}

    @classmethod
    def build(
        cls,
        kind: str,
        sharer: ModelSignature,
        receiver: ModelSignature,
        layers: Iterable[int],
        **hparams,
    ) -> "ProjectorBank":
        return cls(kind, sharer, receiver, layers, **hparams)

    def projector(self, layer: int, which: str) -> Projector:
        table = self._by_layer.get(which)
        if table is None:
            raise ProjectorConfigError(f"which={which!r}; expected 'k' or 'v'.")
        try:
            return table[layer]
        except KeyError:
            raise MissingLayerError(
                f"projector bank has no projector for receiver layer {layer}; it covers {self.layers}. "
                f"Fuse only those layers or train/build a bank for layer {layer}."
            ) from None

    def project(self, layer: int, which: str, sharer_t: Tensor, receiver_t: Tensor) -> Tensor:
        """sharer_t (B, N, Hs, Ds), receiver_t (B, N, Ht, Dt) -> (B, N, Ht, Dt)."""
        return self.projector(layer, which)(sharer_t, receiver_t)

    def projectors(self) -> Iterable[Projector]:
        yield from self.k.values()
        yield from self.v.values()

    def set_temperature(self, tau: float) -> None:
        """Set the Gumbel temperature on every projector that has one (c2c)."""
        for p in self.projectors():
            if isinstance(p, C2CProjector):
                p.set_temperature(tau)

    def reset_state(self) -> None:
        for p in self.projectors():
            p.reset_state()

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, sharer={self.sharer.name or self.sharer}, receiver={self.receiver.name or self.receiver}, layers={self.layers}"


def static_gate(projector: Projector) -> float | None:
    """The part of a projector's gate that does not depend on the data, for reports and plots.

    identity 1; weighted its alpha; full the mean sigmoid of its per-head gate; c2c its inference
    gate (1 open, 0 closed). ``gating`` computes its gate from the inputs: None.
    """
    with torch.no_grad():
        if isinstance(projector, IdentityProjector):
            return 1.0
        if isinstance(projector, WeightedProjector):
            logit = getattr(projector, "alpha_logit", None)
            return float(torch.sigmoid(logit)) if logit is not None else float(projector.alpha)
        if isinstance(projector, C2CProjector):
            return 1.0 if projector.gate_open else 0.0
        if isinstance(projector, FullProjector):
            return float(torch.sigmoid(projector.gate_logit.float()).mean())
    return None
