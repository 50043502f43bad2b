"""Training checkpoints: a projector bundle plus a trainer-state file, both safetensors.

``step_000100.safetensors`` is an ordinary bundle (usable for inference as is);
``step_000100.state.safetensors`` holds what resuming needs: AdamW state tensors, the torch RNG
states as uint8 tensors, and JSON metadata (step, config, LR schedule, loss history). Nothing is
pickled, so a checkpoint folder shared by someone else is as safe to resume as a bundle is to
load. The state file is written last, so its presence means the pair is complete. Both files
are written to a temp file in the folder and renamed into place (a kill leaves the previous
checkpoint intact and no loadable half file); only the last ``keep_last`` pairs are kept, and temp
files of killed writers are removed before each save.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from .bundle import load_bundle, save_bundle
from .errors import BundleError, ResumeError
from .mapping import LayerMap
from .projectors import ProjectorBank
from .tensorfile import load_tensors, read_header, read_meta, remove_stale_temp_files, save_tensors_with_meta

__all__ = ["TRAINER_STATE_KEY", "STATE_FORMAT_VERSION", "Checkpoint", "save_checkpoint", "find_checkpoint", "load_checkpoint",
           "prune_checkpoints", "has_checkpoint", "clear_checkpoints"]

TRAINER_STATE_KEY = "c2c_trainer_state"
STATE_FORMAT_VERSION = 1
_STATE_NAME = re.compile(r"^step_(\d{6,})\.state\.safetensors$")
_CHECKPOINT_NAME = re.compile(r"^step_\d{6,}(\.state)?\.safetensors$")


def _paths(directory: Path, step: int) -> tuple[Path, Path]:
    stem = f"step_{step:06d}"
    return directory / f"{stem}.safetensors", directory / f"{stem}.state.safetensors"


def save_checkpoint(
    directory: str | Path,
    step: int,
    bank: ProjectorBank,
    layer_map: LayerMap,
    optimizer: torch.optim.Optimizer,
    losses: list[float],
    config,
    schedule: dict,
    keep_last: int = 3,
) -> Path:
    """Write the bundle and trainer state for ``step`` completed steps; returns the bundle path.

    Afterwards only the ``keep_last`` newest checkpoints stay in ``directory`` (0 keeps all)."""
    directory = Path(directory)
    remove_stale_temp_files(directory, max_depth=1)
    bundle_path, state_path = _paths(directory, step)
    provenance = {
        "tool": "DiT Cache Bridge c2c_core.train",
        "step": step,
        "steps": config.steps,
        "loss": losses[-1] if losses else None,
        "loss_kind": config.loss,
        "seed": config.seed,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    save_bundle(bundle_path, bank, layer_map, provenance)
    opt = optimizer.state_dict()
    tensors = {}
    for index, entry in opt["state"].items():
        for name, value in entry.items():
            if not torch.is_tensor(value):
                raise BundleError(f"optimizer state {index}.{name} is a {type(value).__name__}; expected tensors only.")
            tensors[f"optimizer.{index}.{name}"] = value
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = state
    meta = {
        "format_version": STATE_FORMAT_VERSION,
        "step": step,
        "bundle": bundle_path.name,
        "config": asdict(config),
        "lr_schedule": schedule,
        "losses": list(losses),
        "optimizer": type(optimizer).__name__,
        "param_groups": [{k: v for k, v in g.items() if k != "params"} | {"num_params": len(g["params"])} for g in opt["param_groups"]],
    }
    save_tensors_with_meta(state_path, tensors, meta, TRAINER_STATE_KEY)
    if keep_last:
        prune_checkpoints(directory, keep_last)
    return bundle_path


def prune_checkpoints(directory: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the ``keep_last`` newest complete checkpoints (state file first, so a pair is never
    left looking complete without its bundle); returns the deleted paths."""
    directory = Path(directory)
    found = sorted(int(m.group(1)) for p in directory.iterdir() if (m := _STATE_NAME.match(p.name)))
    removed = []
    for step in found[:-keep_last] if keep_last > 0 else []:
        bundle_path, state_path = _paths(directory, step)
        for path in (state_path, bundle_path):
            if path.exists():
                path.unlink()
                removed.append(path)
    return removed


def find_checkpoint(resume: str | Path) -> Path:
    """The trainer-state path for ``resume``: a folder (latest step), a state file or its bundle."""
    path = Path(resume)
    if path.is_dir():
        found = sorted(
            (int(m.group(1)), p) for p in path.iterdir() if (m := _STATE_NAME.match(p.name)) and p.is_file()
        )
        if not found:
            raise ResumeError(f"{path}: no step_NNNNNN.state.safetensors checkpoint in this folder; expected a checkpoint_dir of a previous run.")
        return found[-1][1]
    if path.name.endswith(".state.safetensors"):
        state = path
    elif path.suffix == ".safetensors":
        state = path.with_name(path.name[: -len(".safetensors")] + ".state.safetensors")
    else:
        raise ResumeError(f"{path}: expected a checkpoint folder or a step_NNNNNN[.state].safetensors file.")
    if not state.is_file():
        raise ResumeError(f"{state}: trainer state not found; a bundle alone cannot resume training (optimizer state is missing).")
    return state


def has_checkpoint(folder: str | Path) -> bool:
    """Whether ``folder`` holds a checkpoint a run could resume from."""
    try:
        find_checkpoint(folder)
        return True
    except ResumeError:
        return False


def clear_checkpoints(folder: str | Path) -> None:
    """Remove the step_NNNNNN[.state].safetensors files a trainer wrote there (and nothing else)."""
    folder = Path(folder)
    if folder.is_dir():
        for p in folder.iterdir():
            if _CHECKPOINT_NAME.match(p.name):
                p.unlink()


@dataclass
class Checkpoint:
    """What :func:`load_checkpoint` restored."""

    step: int
    losses: list[float]
    bundle_path: Path
    meta: dict


_RESUME_MUST_MATCH = ("steps", "lr", "weight_decay", "warmup_steps", "decay", "grad_clip", "tau_start", "tau_end", "seed", "loss")


def load_checkpoint(
    resume: str | Path,
    bank: ProjectorBank,
    layer_map: LayerMap,
    optimizer: torch.optim.Optimizer,
    config,
) -> Checkpoint:
    """Restore weights into ``bank``, AdamW state into ``optimizer`` and the torch RNG states."""
    state_path = find_checkpoint(resume)
    try:
        return _load_checkpoint(state_path, bank, layer_map, optimizer, config)
    except ResumeError:
        raise
    except BundleError as e:    # damaged or foreign files (NaN in metadata, bad weights): a resume problem
        raise ResumeError(f"{state_path}: the checkpoint cannot be resumed: {e}") from None


def _load_checkpoint(state_path: Path, bank, layer_map, optimizer, config) -> Checkpoint:
    meta = read_meta(state_path, TRAINER_STATE_KEY)
    _, entries = read_header(state_path)
    if meta.get("format_version") != STATE_FORMAT_VERSION:
        raise ResumeError(f"{state_path}: trainer state format {meta.get('format_version')!r}; expected {STATE_FORMAT_VERSION}.")
    saved = meta.get("config") or {}
    now = asdict(config)
    differ = {k: (saved.get(k), now[k]) for k in _RESUME_MUST_MATCH if saved.get(k) != now[k]}
    if differ:
        raise ResumeError(
            f"{state_path}: checkpoint was made with a different training config {differ} "
            f"(saved, given); resume with the same config, or start a new run from the bundle."
        )
    step = meta.get("step")
    if not isinstance(step, int) or not 0 < step <= config.steps:
        raise ResumeError(f"{state_path}: step {step!r}; expected 1..{config.steps}.")
    name = meta.get("bundle", "")
    if not isinstance(name, str) or Path(name).name != name or not name.endswith(".safetensors"):
        raise ResumeError(f"{state_path}: bundle name {name!r}; expected a file name next to the state file.")
    bundle_path = state_path.parent / name
    loaded = load_bundle(bundle_path)
    lb = loaded.bank
    if (lb.kind, lb.hparams, lb.layers) != (bank.kind, bank.hparams, bank.layers) or not (
        lb.sharer.same_shape(bank.sharer) and lb.receiver.same_shape(bank.receiver)
    ):
        raise ResumeError(
            f"{bundle_path}: checkpoint bank is {lb.kind} {lb.hparams} on layers {lb.layers}; the bank "
            f"given is {bank.kind} {bank.hparams} on layers {bank.layers}. Build the same bank to resume."
        )
    if loaded.layer_map.pairs != layer_map.pairs:
        raise ResumeError(f"{bundle_path}: checkpoint layer map {loaded.layer_map.pairs} differs from {layer_map.pairs}.")
    bank.load_state_dict(lb.state_dict())

    params = [p for group in optimizer.param_groups for p in group["params"]]
    opt_names = [n for n in entries if n.startswith("optimizer.")]
    tensors = load_tensors(state_path, opt_names + [n for n in entries if n.startswith("rng.")])
    state: dict[int, dict] = {}
    for name in opt_names:
        _, index, field = name.split(".", 2)
        if not index.isdigit() or int(index) >= len(params):
            raise ResumeError(f"{state_path}: optimizer state {name!r} names parameter {index}; the bank has {len(params)}.")
        state.setdefault(int(index), {})[field] = tensors[name]
    for index, entry in state.items():
        for field in ("exp_avg", "exp_avg_sq"):
            if field in entry and entry[field].shape != params[index].shape:
                raise ResumeError(
                    f"{state_path}: optimizer {field} of parameter {index} has shape {list(entry[field].shape)}; "
                    f"expected {list(params[index].shape)}."
                )
        _check_optimizer_values(state_path, index, entry, step)
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})
    _restore_rng(state_path, tensors)
    losses = meta.get("losses") or []
    if not isinstance(losses, list) or not all(type(x) in (int, float) and math.isfinite(x) for x in losses):
        raise ResumeError(f"{state_path}: the saved losses hold a non-finite or non-numeric value; the run it comes "
                          f"from diverged. Resume from an earlier checkpoint or start a new run.")
    if len(losses) != step:
        raise ResumeError(f"{state_path}: {len(losses)} recorded losses for step {step}; the file is inconsistent.")
    return Checkpoint(step=step, losses=[float(x) for x in losses], bundle_path=bundle_path, meta=meta)


_RESUME_FIX = "Resume from an earlier checkpoint, or start a new run (resume off)"


def _check_optimizer_values(state_path: Path, index: int, entry: dict, step: int) -> None:
    """A NaN anywhere in AdamW's state (its ``step`` counter included) makes every weight NaN at the next step,
    and the run would then save a bundle no loader accepts: refuse the checkpoint before a step is taken."""
    for field, value in sorted(entry.items()):
        if not value.is_floating_point() and value.dtype not in (torch.int64, torch.int32):
            raise ResumeError(f"{state_path}: optimizer {field} of parameter {index} is {value.dtype}; expected "
                              f"float tensors (the file was not written by this trainer). {_RESUME_FIX}.")
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise ResumeError(f"{state_path}: optimizer {field} of parameter {index} holds NaN or Inf; expected "
                              f"finite values (the run it comes from diverged, or the file was damaged). {_RESUME_FIX}.")
    count = entry.get("step")
    if count is not None and (count.numel() != 1 or float(count) != int(float(count)) or not 0 <= float(count) <= step):
        raise ResumeError(f"{state_path}: optimizer step of parameter {index} is {count.flatten()[:4].tolist()}; expected "
                          f"one whole number from 0 to the checkpoint's step {step}. {_RESUME_FIX}.")
    if "exp_avg_sq" in entry and bool((entry["exp_avg_sq"] < 0).any()):
        raise ResumeError(f"{state_path}: optimizer exp_avg_sq of parameter {index} holds negative values; expected "
                          f"values >= 0 (a mean of squares). {_RESUME_FIX}.")


def _restore_rng(state_path: Path, tensors: dict) -> None:
    """Set the torch RNG states a checkpoint saved, refusing ones of another dtype or length (torch would raise a
    bare TypeError or RuntimeError that names no file)."""
    if "rng.cpu" not in tensors:
        raise ResumeError(f"{state_path}: no 'rng.cpu' tensor; cannot resume bit-exactly.")
    cuda_names = sorted((n for n in tensors if n.startswith("rng.cuda.")), key=lambda n: n.rsplit(".", 1)[1].zfill(8))
    restore = [("rng.cpu", torch.get_rng_state(), torch.set_rng_state)]
    if torch.cuda.is_available():
        restore += [(n, torch.cuda.get_rng_state(i), lambda t, i=i: torch.cuda.set_rng_state(t, i))
                    for i, n in enumerate(cuda_names[:torch.cuda.device_count()])]
    for name, current, setter in restore:
        saved = tensors[name]
        if saved.dtype != torch.uint8 or saved.shape != current.shape:
            raise ResumeError(f"{state_path}: random-number state {name!r} is {saved.dtype} of shape "
                              f"{list(saved.shape)}; expected torch.uint8 of shape {list(current.shape)} (this torch's "
                              f"generator). {_RESUME_FIX}.")
        try:
            setter(saved)
        except (TypeError, RuntimeError, ValueError) as e:
            raise ResumeError(f"{state_path}: random-number state {name!r} is not a valid generator state "
                              f"({e}). {_RESUME_FIX}.") from None
