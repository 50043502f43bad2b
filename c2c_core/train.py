"""Projector training loop over caller-supplied callables (no ComfyUI, no dataset format).

As in Cache-to-Cache (C2C), both models stay frozen and only the bank learns, with the receiver's own
objective. The caller supplies ``batches(step) -> batch`` (deterministic in ``step``) and
``loss_fn(bank, batch) -> scalar tensor``; the builders below make the usual loss functions.
The caller keeps the DiTs frozen (``requires_grad_(False)``) so no gradient is spent on them.

Determinism: a fresh run seeds torch's global RNG with ``config.seed`` (this changes the caller's
global RNG); the LR and Gumbel temperature are pure functions of the step; checkpoints store the
optimizer state and RNG states, so an interrupted run resumed from its checkpoint ends with the
same weights, bit for bit, as an uninterrupted one (tests/core/test_train.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .checkpoint import load_checkpoint, save_checkpoint
from .errors import C2CError, ResumeError, TrainError
from .mapping import LayerMap
from .projectors import ProjectorBank

__all__ = [
    "TrainConfig",
    "TrainResult",
    "train_bank",
    "velocity_loss",
    "distill_loss",
    "kv_loss",
    "DECAYS",
    "LOSS_KINDS",
    "TrainError",
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
class TrainResult:
    losses: list[float]
    bank: ProjectorBank
    last_checkpoint: Optional[str] = None


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
                raise TrainError(f"train_bank: loss is {value} at step {step + 1}; lower lr or check the inputs for NaN/inf.")
            losses.append(value)
            done = step + 1
            if config.checkpoint_every and (done % config.checkpoint_every == 0 or done == config.steps):
                path = save_checkpoint(
                    Path(config.checkpoint_dir), done, bank, layer_map, optimizer, losses, config, config.schedule_description()
                )
                last_checkpoint = str(path)
            if progress is not None:
                progress(done, value)
    finally:
        bank.eval()
    return TrainResult(losses=losses, bank=bank, last_checkpoint=last_checkpoint)


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
