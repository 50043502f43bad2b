"""Projector training loop over caller-supplied callables (no host, no dataset format).

As in Cache-to-Cache (C2C), both models stay frozen and only the bank learns, with the receiver's own
objective. The caller supplies ``batches(step) -> batch`` (deterministic in ``step``) and
``loss_fn(bank, batch) -> scalar tensor``; the builders below make the usual loss functions.
The caller keeps the DiTs frozen (``requires_grad_(False)``) so no gradient is spent on them.

Determinism: a fresh run seeds torch's global RNG with ``config.seed`` (this changes the caller's
global RNG); the LR and Gumbel temperature are pure functions of the step; checkpoints store the
optimizer state and RNG states, so an interrupted run resumed from its checkpoint ends with the
same weights, bit for bit, as an uninterrupted one (tests/core/test_train.py).

:func:`run_training` is ``train_bank`` with what every front end adds around it (the node, both command
lines): the checkpoint folder's resume/restart policy and data parallelism under torchrun
(:class:`DataParallel`: same start weights on every rank, gradients averaged, rank 0 writes).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from .checkpoint import clear_checkpoints, has_checkpoint, load_checkpoint, save_checkpoint
from .errors import C2CError, DivergedError, ResumeError, TrainError
from .mapping import LayerMap
from .projectors import ProjectorBank

__all__ = [
    "TrainConfig",
    "TrainSettings",
    "TrainResult",
    "train_bank",
    "run_training",
    "DataParallel",
    "trainable_copy",
    "provenance",
    "velocity_loss",
    "distill_loss",
    "kv_loss",
    "DECAYS",
    "LOSS_KINDS",
    "TrainError",
    "DivergedError",
    "ResumeError",
]

DECAYS = ("cosine", "linear", "constant")
LOSS_KINDS = ("velocity", "distill", "kv")


def _number(name: str, value: Any, lo: float, lo_open: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = value > lo if lo_open else value >= lo
    if not ok:
        raise TrainError(f"TrainConfig.{name}={value!r}; expected a finite number {'>' if lo_open else '>='} {lo}.")
    return float(value)


def _integer(name: str, value: Any, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise TrainError(f"TrainConfig.{name}={value!r}; expected an integer >= {lo}.")
    return value


@dataclass
class TrainConfig:
    """Optimisation settings. ``loss`` labels the objective in checkpoints; ``loss_fn`` does the work."""

    steps: int
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup_steps: int = 0
    decay: str = "cosine"
    grad_clip: float = 1.0
    tau_start: float = 1.0
    tau_end: float = 0.001
    checkpoint_every: int = 0
    checkpoint_dir: Optional[str] = None
    seed: int = 0
    loss: str = "velocity"

    def __post_init__(self) -> None:
        _integer("steps", self.steps, 1)
        _number("lr", self.lr, 0.0, lo_open=True)
        _number("weight_decay", self.weight_decay, 0.0)
        _integer("warmup_steps", self.warmup_steps, 0)
        if self.warmup_steps >= self.steps:
            raise TrainError(f"TrainConfig.warmup_steps={self.warmup_steps} leaves no step after warm-up; expected < steps={self.steps}.")
        if self.decay not in DECAYS:
            raise TrainError(f"TrainConfig.decay={self.decay!r}; expected one of {DECAYS}.")
        _number("grad_clip", self.grad_clip, 0.0)
        _number("tau_start", self.tau_start, 0.0, lo_open=True)
        _number("tau_end", self.tau_end, 0.0, lo_open=True)
        _integer("checkpoint_every", self.checkpoint_every, 0)
        if self.checkpoint_every and not self.checkpoint_dir:
            raise TrainError(f"TrainConfig.checkpoint_every={self.checkpoint_every} needs checkpoint_dir; set a folder or use 0.")
        if self.checkpoint_dir is not None:
            self.checkpoint_dir = str(self.checkpoint_dir)
        _integer("seed", self.seed, 0)
        if self.loss not in LOSS_KINDS:
            raise TrainError(f"TrainConfig.loss={self.loss!r}; expected one of {LOSS_KINDS}.")

    def lr_at(self, step: int) -> float:
        """Learning rate of 0-based ``step``: linear warm-up, then decay (never reaching 0)."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        p = (step - self.warmup_steps) / (self.steps - self.warmup_steps)
        if self.decay == "cosine":
            return self.lr * 0.5 * (1.0 + math.cos(math.pi * p))
        if self.decay == "linear":
            return self.lr * (1.0 - p)
        return self.lr

    def tau_at(self, step: int) -> float:
        """Gumbel temperature of ``step``: exponential from tau_start (step 0) to tau_end (last step)."""
        if self.steps == 1:
            return self.tau_start
        return self.tau_start * (self.tau_end / self.tau_start) ** (step / (self.steps - 1))

    def schedule_description(self) -> dict:
        return {"kind": f"warmup_{self.decay}", "base_lr": self.lr, "warmup_steps": self.warmup_steps, "steps": self.steps}


@dataclass
class TrainSettings(TrainConfig):
    """TrainConfig plus what feeding a host's training pair needs: samples per step (per process) and the
    share of items that train on the negative conditioning."""
    batch_size: int = 1
    negative_share: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise TrainError(f"TrainConfig.batch_size={self.batch_size!r}; expected an integer >= 1.")
        if isinstance(self.negative_share, bool) or not isinstance(self.negative_share, (int, float)) \
                or not 0.0 <= self.negative_share <= 1.0:
            raise TrainError(f"TrainConfig.negative_share={self.negative_share!r}; expected a number in [0, 1].")


@dataclass
class TrainResult:
    losses: list[float]
    bank: ProjectorBank
    last_checkpoint: Optional[str] = None
    resumed_at: int = 0


def train_bank(
    bank: ProjectorBank,
    layer_map: LayerMap,
    batches: Callable[[int], Any],
    loss_fn: Callable[[ProjectorBank, Any], Tensor],
    config: TrainConfig,
    resume: Optional[str] = None,
    progress: Optional[Callable[[int, float], None]] = None,
    reduce_grads: Optional[Callable[[list[Tensor]], None]] = None,
) -> TrainResult:
    """Train ``bank`` with AdamW for ``config.steps`` steps; returns the loss of every step.

    ``progress(done, loss)`` is called after each step with the number of completed steps
    (1..steps). ``resume`` is a checkpoint folder (latest checkpoint) or file; the returned losses
    then include the steps done before the interruption. The bank is left in eval mode.

    ``reduce_grads(params)`` is called after each backward pass, before gradient clipping, with
    the trainable parameters: data-parallel training averages their gradients across processes
    there, so every process clips and steps identically.
    """
    if bank.layers != layer_map.layers:
        raise TrainError(f"train_bank: bank layers {bank.layers} differ from the layer map's {layer_map.layers}; expected the same.")
    try:
        layer_map.validate(bank.sharer, bank.receiver)
    except C2CError as exc:
        raise TrainError(f"train_bank: {exc}") from None
    params = [p for p in bank.parameters() if p.requires_grad]
    if not params:
        raise TrainError(f"train_bank: the {bank.kind!r} bank has no trainable parameters; pick 'gating', 'full', 'c2c' or weighted(learnable=True).")
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    losses: list[float] = []
    start, last_checkpoint = 0, None
    if resume is not None:
        restored = load_checkpoint(resume, bank, layer_map, optimizer, config)
        start, losses, last_checkpoint = restored.step, restored.losses, str(restored.bundle_path)
    else:
        torch.manual_seed(config.seed)
    bank.train()
    try:
        for step in range(start, config.steps):
            for group in optimizer.param_groups:
                group["lr"] = config.lr_at(step)
            bank.set_temperature(config.tau_at(step))
            loss = loss_fn(bank, batches(step))
            if not torch.is_tensor(loss) or loss.dim() != 0 or not loss.requires_grad:
                raise TrainError(
                    f"train_bank: loss_fn returned {type(loss).__name__} "
                    f"{tuple(loss.shape) if torch.is_tensor(loss) else ''}; expected a scalar tensor that "
                    f"depends on the bank (requires_grad)."
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if reduce_grads is not None:
                reduce_grads(params)
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            optimizer.step()
            value = float(loss.detach())
            if not math.isfinite(value):
                raise DivergedError(f"train_bank: loss is {value} at step {step + 1}; lower lr or check the inputs for NaN/inf.")
            losses.append(value)
            done = step + 1
            if config.checkpoint_every and (done % config.checkpoint_every == 0 or done == config.steps):
                _check_weights(bank, done)
                path = save_checkpoint(
                    Path(config.checkpoint_dir), done, bank, layer_map, optimizer, losses, config, config.schedule_description()
                )
                last_checkpoint = str(path)
            if progress is not None:
                progress(done, value)
    finally:
        bank.eval()
    _check_weights(bank, len(losses))
    return TrainResult(losses=losses, bank=bank, last_checkpoint=last_checkpoint)


def _check_weights(bank: ProjectorBank, done: int) -> None:
    """Refuse a bank whose weights went NaN/Inf (a step on a damaged optimizer state does that while the loss of
    that step still looks fine): nothing is saved that Load C2C Projector would refuse."""
    with torch.no_grad():
        bad = [name for name, t in bank.state_dict().items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        shown = bad[:4] + (["…"] if len(bad) > 4 else [])
        raise DivergedError(f"train_bank: the projector's weights {shown} hold NaN or Inf after step {done}; expected "
                         f"finite weights. Nothing was saved for this step. Lower lr, resume from an earlier "
                         f"checkpoint, or start a new run (resume off).")


# ----------------------------------------------------------------------------------------------
# front ends: data parallelism, checkpoint-folder policy, a fresh trainable bank


@dataclass(frozen=True)
class DataParallel:
    """This process's place under torchrun (rank 0 of 1 without it): same weights on every rank, gradients averaged."""

    rank: int = 0
    world: int = 1

    @classmethod
    def current(cls) -> "DataParallel":
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @property
    def active(self) -> bool:
        return self.world > 1

    def broadcast(self, bank: ProjectorBank) -> None:
        """Every rank starts from rank 0's weights."""
        if self.active:
            with torch.no_grad():
                for tensor in list(bank.parameters()) + list(bank.buffers()):
                    dist.broadcast(tensor, 0)

    def reduce_grads(self, params: list[Tensor]) -> None:
        """Average gradients over ranks in one flat all-reduce (fixed order: identical on every rank)."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = flat[offset:offset + n].view_as(p).clone()
            offset += n


def trainable_copy(bundle) -> ProjectorBank:
    """A fresh float32 bank with the bundle's weights (inference-mode tensors from a node become normal ones)."""
    bank = bundle.bank
    with torch.inference_mode(False):
        fresh = ProjectorBank.build(bank.kind, bank.sharer, bank.receiver, bank.layers, **bank.hparams)
        with torch.no_grad():
            fresh.load_state_dict({k: v.detach().clone().float() for k, v in bank.state_dict().items()})
    return fresh.float()


def run_training(
    bank: ProjectorBank,
    layer_map: LayerMap,
    batches: Callable[[int], Any],
    loss_fn: Callable[[ProjectorBank, Any], Tensor],
    config: TrainConfig,
    *,
    checkpoint_dir=None,
    resume: bool = True,
    progress: Optional[Callable[[int, int, float], None]] = None,
    parallel: Optional[DataParallel] = None,
) -> TrainResult:
    """:func:`train_bank` as the front ends run it; ``result.resumed_at`` is the step a resumed run began at.

    Checkpoints go to ``checkpoint_dir`` (default ``config.checkpoint_dir``) every ``config.checkpoint_every``
    steps, from rank 0 only. With ``resume`` the run continues from the latest checkpoint there (same
    settings required); without, rank 0 deletes that folder's checkpoints first. ``progress(done, total,
    loss)`` runs after every step (raise from it to stop: the checkpoints stay). Under torchrun every rank
    calls this with the same arguments and its own ``batches``; rank 0's start weights are broadcast and
    gradients are averaged.
    """
    parallel = parallel or DataParallel.current()
    parallel.broadcast(bank)
    writer = parallel.rank == 0
    checkpoint_dir = checkpoint_dir if checkpoint_dir is not None else config.checkpoint_dir
    keeps = writer and checkpoint_dir is not None
    config = dataclasses.replace(config, checkpoint_dir=str(checkpoint_dir) if keeps else None,
                                 checkpoint_every=config.checkpoint_every if keeps else 0)
    resume_from = None
    if checkpoint_dir is not None:
        if not resume and writer:
            clear_checkpoints(checkpoint_dir)
        if parallel.active:
            dist.barrier()
        if resume and has_checkpoint(checkpoint_dir):
            resume_from = str(checkpoint_dir)
    ran = [0]

    def on_step(done, value):
        ran[0] += 1
        if progress is not None:
            progress(done, config.steps, value)

    result = train_bank(bank, layer_map, batches, loss_fn, config, resume=resume_from, progress=on_step,
                        reduce_grads=parallel.reduce_grads if parallel.active else None)
    result.resumed_at = len(result.losses) - ran[0]
    return result


def provenance(tool: str, config: TrainConfig, result: TrainResult, samples: int, processes: int = 1) -> dict:
    """What a trained bundle records about its training run."""
    return {"tool": tool, "loss": config.loss, "steps": config.steps,
            "batch_size": getattr(config, "batch_size", 1), "lr": config.lr, "seed": config.seed,
            "final_loss": result.losses[-1] if result.losses else None, "samples": samples,
            "processes": processes, "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


# ----------------------------------------------------------------------------------------------
# loss builders


def _mse(prediction: Tensor, target: Tensor, what: str) -> Tensor:
    if prediction.shape != target.shape:
        raise TrainError(f"{what}: prediction {tuple(prediction.shape)} vs target {tuple(target.shape)}; expected equal shapes.")
    return F.mse_loss(prediction.float(), target.float())


def velocity_loss(predict: Callable[[ProjectorBank, Any], tuple[Tensor, Tensor]]) -> Callable[[ProjectorBank, Any], Tensor]:
    """Flow-matching loss: ``predict(bank, batch) -> (bridged receiver velocity, noise - x0)``; MSE."""

    def loss_fn(bank: ProjectorBank, batch: Any) -> Tensor:
        prediction, target = predict(bank, batch)
        return _mse(prediction, target.detach(), "velocity_loss")

    return loss_fn


def distill_loss(
    predict: Callable[[ProjectorBank, Any], Tensor], teacher: Callable[[Any], Tensor]
) -> Callable[[ProjectorBank, Any], Tensor]:
    """MSE between the bridged receiver's ``predict(bank, batch)`` and ``teacher(batch)`` (no grad)."""

    def loss_fn(bank: ProjectorBank, batch: Any) -> Tensor:
        prediction = predict(bank, batch)
        with torch.no_grad():
            target = teacher(batch)
        return _mse(prediction, target, "distill_loss")

    return loss_fn


def kv_loss(bank: ProjectorBank, batch: Mapping[int, Mapping[str, tuple[Tensor, Tensor, Tensor]]]) -> Tensor:
    """Mean MSE of projected K/V against targets.

    ``batch[layer][which] = (sharer_t, receiver_t, target_t)`` for receiver ``layer`` and
    ``which`` in {"k", "v"}; each tensor (B, N, H, D) in its model's shape.
    """
    terms = [
        _mse(bank.project(layer, which, s, r), target, f"kv_loss layer {layer} {which}")
        for layer, entries in batch.items()
        for which, (s, r, target) in entries.items()
    ]
    if not terms:
        raise TrainError("kv_loss: the batch holds no (sharer, receiver, target) triples; expected {layer: {'k': (...), 'v': (...)}}.")
    return torch.stack(terms).mean()
