"""The first-GPU check: every bridge mode at Wan2.1-1.3B and Wan2.1-14B shapes, one table, within 8 minutes.

    python benchmarks/gpu_check.py --device cuda                     # on one H100 (BENCHMARKS.md, "On a GPU")
    .venv/bin/python benchmarks/gpu_check.py --device cpu --tiny     # the same code path at tiny shapes (make test)

A GPU comes with ~15 minutes of device time in all, so this script spends it on what a 14B user asks:
seconds per step of receiver alone, sharer alone, live lockstep, refresh every 4, record and replay;
each mode's peak VRAM on its own (models unloaded and caches emptied before it, peaks above that
baseline); host RAM at peak; and whether live lockstep of two 14B models fits the card with ComfyUI's
own loading, and what ComfyUI's partial loading costs per step when it does not.

Every run goes through the pack's nodes (Create C2C Projector, Capture KV Cache, Record KV Cache, Fuse
Caches) and the stock KSampler, on random-weight Wan models drawn on the device in bf16 and loaded with
ComfyUI's own loader (bench_setup.load_random_wan). Each mode has a one-step warm-up run (CUDA kernels,
the weight upload) before its timed run. The expected H100 runtime is printed before the first phase
(arithmetic in :func:`expected_seconds`, derivation in BENCHMARKS.md); a phase starts only when its
expected time fits the budget, and a watchdog interrupts sampling at the budget itself, so the table
says "skipped: time budget" instead of the check running over.
"""
from __future__ import annotations

import argparse
import functools
import gc
import importlib.util
import json
import math
import platform
import shutil
import subprocess
import tempfile
import threading
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

from bench_setup import GB, load_random_wan, setup_host, wan_params

MODES = ("receiver alone", "sharer alone", "live lockstep", "refresh 4", "record", "replay")
FIT_MODES = ("live lockstep", "live lockstep, partial load")
REFRESH = 4
CFG = 5.0                 # > 1: one batched cond + uncond call per step, as Wan is sampled
SEED = 7


@dataclass(frozen=True)
class Phase:
    """One pair of models and the modes measured on it."""
    label: str
    dim: int
    ffn: int
    layers: int            # layers built and measured
    full_layers: int       # the real model's depth; s/step is extrapolated to it when layers is fewer
    latent: tuple          # (channels, frames, height, width)
    text_tokens: int
    modes: tuple

    @property
    def tokens(self) -> int:
        c, t, h, w = self.latent
        return t * (h // 2) * (w // 2)


LATENT_480P_81 = (16, 21, 60, 104)     # 480x832, 81 frames: 32,760 tokens
TINY_LATENT = (16, 2, 8, 8)


def phases(tiny: bool, layers_14b: int) -> list[Phase]:
    """The check's phases, most important first (the budget skips from the end)."""
    if tiny:
        return [Phase("Wan2.1-1.3B (tiny stand-in)", 256, 512, 2, 2, TINY_LATENT, 8, MODES),
                Phase("Wan2.1-14B (tiny stand-in)", 256, 512, 2, 4, TINY_LATENT, 8, MODES),
                Phase("Wan2.1-14B (tiny stand-in)", 256, 512, 4, 4, TINY_LATENT, 8, FIT_MODES)]
    return [Phase("Wan2.1-1.3B", 1536, 8960, 30, 30, LATENT_480P_81, 512, MODES),
            Phase("Wan2.1-14B", 5120, 13824, layers_14b, 40, LATENT_480P_81, 512, MODES),
            Phase("Wan2.1-14B", 5120, 13824, 40, 40, LATENT_480P_81, 512, FIT_MODES)]


def timed_steps(mode: str, steps: int) -> int:
    """Refresh every 4 is timed over one whole refresh cycle, else its s/step says nothing about k = 4."""
    return max(steps, REFRESH) if mode == "refresh 4" else steps


# -- expected runtime on one H100 ----------------------------------------------------------------
# Assumptions (BENCHMARKS.md, "On a GPU", derives them): bf16 dense matmul + flash attention at 350 TFLOP/s
# effective (35 % of the H100 SXM's 989 peak); pageable host<->device copies at 10 GB/s; per run 1.0 s of
# ComfyUI and bridge machinery (the CPU dry run: 0.5-1.4 s per mode of two tiny runs) and 25 s to boot.
H100_FLOPS = 350e12
COPY_BYTES_PER_S = 10e9
RUN_OVERHEAD_S = 1.0
BOOT_S = 25.0


def block_flops_per_token(dim: int, ffn: int, tokens: int, text_tokens: int) -> float:
    """One Wan block, per token: self-attention q,k,v,o + cross-attention q,o + FFN + the two attentions."""
    macs = 4 * dim * dim + 2 * dim * dim + 2 * dim * ffn + 2 * tokens * dim + 2 * text_tokens * dim
    return 2.0 * macs


def step_seconds(phase: Phase) -> float:
    """One batched-CFG model call (2 chunks) on an H100, by FLOPs."""
    per_token = block_flops_per_token(phase.dim, phase.ffn, phase.tokens, phase.text_tokens)
    return per_token * phase.tokens * 2 * phase.layers / H100_FLOPS


def kv_step_bytes(phase: Phase) -> int:
    """K and V of every layer for one step, both CFG chunks, bf16: what record moves off and replay back on."""
    return 2 * 2 * phase.tokens * phase.dim * 2 * phase.layers


@functools.cache
def weight_bytes(phase: Phase) -> int:
    """bf16 weights of one model of the phase (counted on the meta device, once per phase)."""
    return 2 * wan_params(phase.dim, phase.ffn, phase.layers)


def expected_seconds(phase: Phase, mode: str, steps: int, partial_card_gb: float = 48.0) -> float:
    """Seconds one mode takes on an H100: warm-up (1 step) + timed run, weight uploads, K/V copies, machinery."""
    step, copy = step_seconds(phase), COPY_BYTES_PER_S
    weights = weight_bytes(phase)
    n = timed_steps(mode, steps)
    runs = 1 + n
    if mode in ("receiver alone", "sharer alone"):
        return runs * step + weights / copy + 2 * RUN_OVERHEAD_S
    if mode == "refresh 4":
        return (2 + n + math.ceil(n / REFRESH)) * step + 2 * weights / copy + 2 * RUN_OVERHEAD_S
    if mode == "record" or mode == "replay":
        return runs * step + runs * kv_step_bytes(phase) / copy + weights / copy + 2 * RUN_OVERHEAD_S
    live = 2 * runs * step + 2 * weights / copy + 2 * RUN_OVERHEAD_S
    if mode == "live lockstep, partial load":
        streamed = max(0.0, 2 * weights - partial_card_gb * GB * 0.8)
        live += runs * streamed / copy
    return live


def expected_phase_setup(phase: Phase) -> float:
    """Two models drawn on the device and copied to ComfyUI's offload device (the host) by its loader."""
    return 2 * weight_bytes(phase) / COPY_BYTES_PER_S + 2.0


def plan(all_phases: list[Phase], steps: int) -> list[tuple[str, float]]:
    """(what, expected H100 seconds) for the whole check, boot first."""
    out = [("boot ComfyUI, CUDA init", BOOT_S)]
    for p in all_phases:
        total = expected_phase_setup(p) + sum(expected_seconds(p, m, steps) for m in p.modes)
        out.append((f"{p.label}, {p.layers} layers: {' / '.join(p.modes)}", total))
    return out


def print_plan(rows: list[tuple[str, float]], budget_s: float) -> None:
    print("expected for --device cuda on one H100 (FLOP and copy arithmetic, BENCHMARKS.md):")
    for what, seconds in rows:
        print(f"  {seconds:6.0f} s  {what}")
    total = sum(s for _, s in rows)
    print(f"  {total:6.0f} s  in all ({total / 60:.1f} min); hard budget {budget_s:.0f} s", flush=True)


# -- the budget ----------------------------------------------------------------------------------
class Budget:
    """Starts a mode only when its expected time, scaled by how much slower than expected the check has
    run so far, fits what is left; ``interrupt`` fires at the limit itself (the watchdog)."""

    def __init__(self, seconds: float, clock=time.monotonic):
        self.seconds, self.clock, self.start = seconds, clock, clock()
        self.expected_done = self.took_done = 0.0
        self._timer = None

    def elapsed(self) -> float:
        return self.clock() - self.start

    def slowness(self) -> float:
        return max(1.0, self.took_done / self.expected_done) if self.expected_done else 1.0

    def allows(self, expected: float) -> bool:
        return self.elapsed() + expected * self.slowness() <= self.seconds

    def done(self, expected: float, took: float) -> None:
        self.expected_done += expected
        self.took_done += took

    def arm(self, interrupt) -> None:
        """Call ``interrupt`` when the budget runs out, whatever is running then."""
        self._timer = threading.Timer(max(0.0, self.seconds - self.elapsed()), interrupt)
        self._timer.daemon = True
        self._timer.start()

    def disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()


def say(budget: Budget, text: str) -> None:
    print(f"[{budget.elapsed():6.1f} s] {text}", flush=True)


# -- one device ----------------------------------------------------------------------------------
class Device:
    """Isolation, clocks and memory peaks of the device ComfyUI runs on (CUDA, or the CPU with n/a memory)."""

    def __init__(self, kind: str):
        import torch
        self.torch, self.cuda = torch, kind == "cuda"

    def isolate(self) -> tuple[int, int] | None:
        """Unload every model, free cached blocks, restart the peak counters; returns the baseline."""
        import comfy.model_management as mm
        mm.unload_all_models()
        gc.collect()
        mm.soft_empty_cache()
        if not self.cuda:
            return None
        self.torch.cuda.synchronize()
        self.torch.cuda.reset_peak_memory_stats()
        return self.torch.cuda.memory_allocated(), self.torch.cuda.memory_reserved()

    def peaks_above(self, baseline) -> tuple[int | None, int | None]:
        if baseline is None:
            return None, None
        return (self.torch.cuda.max_memory_allocated() - baseline[0],
                self.torch.cuda.max_memory_reserved() - baseline[1])

    def timed(self, fn) -> float:
        if self.cuda:
            self.torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if self.cuda:
            self.torch.cuda.synchronize()
        return time.perf_counter() - start

    def total_bytes(self) -> float:
        return self.torch.cuda.get_device_properties(0).total_memory if self.cuda else 0.0

    def describe(self) -> str:
        torch = self.torch
        if not self.cuda:
            return (f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads), "
                    f"torch {torch.__version__}")
        props = torch.cuda.get_device_properties(0)
        return (f"{torch.cuda.get_device_name()} ({props.total_memory / GB:.1f} GB), torch {torch.__version__}, "
                f"CUDA {torch.version.cuda}, driver {nvidia_smi() or 'unknown (no nvidia-smi)'}")


def nvidia_smi() -> str | None:
    """The driver version (and the card as nvidia-smi names it), when nvidia-smi is installed."""
    if shutil.which("nvidia-smi") is None:
        return None
    out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,name", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=20)
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


class reserved_vram:
    """ComfyUI's ``--reserve-vram`` for the duration of a run: it loads as if the card had ``nbytes`` less."""

    def __init__(self, nbytes: float):
        self.nbytes = int(nbytes)

    def __enter__(self):
        import comfy.model_management as mm
        mm.EXTRA_RESERVED_VRAM += self.nbytes
        return self

    def __exit__(self, *exc):
        import comfy.model_management as mm
        mm.EXTRA_RESERVED_VRAM -= self.nbytes


class HostRamPeak:
    """Peak resident host memory above the start of the block, sampled every 20 ms by a thread
    (ru_maxrss only ever rises, so it cannot isolate one mode)."""

    def __enter__(self):
        import psutil
        self._process = psutil.Process()
        self.start = self.peak = self._process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self._process.memory_info().rss)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)

    @property
    def above_start(self) -> int:
        return self.peak - self.start


def weights_on_device() -> float | None:
    """Fraction of the loaded models' weights ComfyUI put on the device (1.0: fully loaded; less: partial)."""
    import comfy.model_management as mm
    patchers = {id(p.model): p for p in mm.loaded_models()}.values()
    total = sum(p.model_size() for p in patchers)
    return sum(p.loaded_size() for p in patchers) / total if total else None


# -- the models and the modes, through the nodes -------------------------------------------------
class Pair:
    """A receiver and a sharer at one phase's shape, and each mode's run made from the pack's nodes."""

    def __init__(self, phase: Phase, device: str, projector_kind: str):
        import torch
        from bridge_helpers import pack_nodes
        from comfy_test_nodes import wan_conditioning
        self.phase, self.nodes = phase, pack_nodes()
        shape = (phase.dim, phase.ffn, phase.layers)
        self.receiver = load_random_wan(*shape, seed=1, device=device, dtype=torch.bfloat16)
        self.sharer = load_random_wan(*shape, seed=2, device=device, dtype=torch.bfloat16)
        self.positive, self.negative = (wan_conditioning(s, phase.text_tokens) for s in (1, 2))
        self.sharer_positive, self.sharer_negative = (wan_conditioning(s, phase.text_tokens) for s in (3, 4))
        self.latent = {"samples": torch.zeros(1, *phase.latent)}
        self.projector = self.nodes.CreateC2CProjector.execute(
            sharer=self.sharer, receiver=self.receiver, kind=projector_kind, mapping="identity", layers="all",
            alpha=0.5, hidden_dim=0, seed=0).args[0]
        self.recordings = {}

    def sample(self, model, steps: int, sharer_conds: bool = False) -> None:
        from bridge_helpers import ksample
        pos, neg = (self.sharer_positive, self.sharer_negative) if sharer_conds else (self.positive, self.negative)
        ksample(model, pos, neg, cfg=CFG, seed=SEED, steps=steps, latent=self.latent)

    def capture(self, refresh_every: int):
        return self.nodes.CaptureKVCache.execute(
            sharer=self.sharer, positive=self.sharer_positive, negative=self.sharer_negative, layers="auto",
            refresh_every=refresh_every, projector=self.projector).args[0]

    def record(self, steps: int):
        return self.nodes.RecordKVCache.execute(
            sharer=self.sharer, positive=self.sharer_positive, negative=self.sharer_negative,
            latent_image=self.latent, seed=SEED, steps=steps, cfg=CFG, sampler_name="euler", scheduler="simple",
            denoise=1.0, layers="auto", storage_dtype="bf16", storage="ram", projector=self.projector).args[0]

    def fuse(self, source):
        return self.nodes.FuseCaches.execute(model=self.receiver, kv_source=source, projector=self.projector,
                                             strength=1.0, start_percent=0.0, end_percent=1.0).args[0]

    def runner(self, mode: str):
        """The mode's run of n steps. Bridged clones are made once per mode (ComfyUI reuses a node's output);
        record keeps each recording by its step count, and replay fuses the one of its own length."""
        if mode == "receiver alone":
            return lambda n: self.sample(self.receiver, n)
        if mode == "sharer alone":
            return lambda n: self.sample(self.sharer, n, sharer_conds=True)
        if mode in ("live lockstep", "live lockstep, partial load"):
            live = self.fuse(self.capture(1))
            return lambda n: self.sample(live, n)
        if mode == "refresh 4":
            refreshed = self.fuse(self.capture(REFRESH))
            return lambda n: self.sample(refreshed, n)
        if mode == "record":
            return lambda n: self.recordings.__setitem__(n, self.record(n))
        if mode == "replay":
            replays = {n: self.fuse(recording) for n, recording in self.recordings.items()}
            return lambda n: self.sample(replays[n], n)
        raise ValueError(f"unknown mode {mode!r}")


# -- measuring -----------------------------------------------------------------------------------
@dataclass
class Row:
    """One line of the table (sizes in bytes; None: not measured, or n/a on this device)."""
    shape: str
    layers: int
    full_layers: int
    mode: str
    steps: int = 0
    seconds_per_step: float | None = None
    vram_allocated: int | None = None
    vram_reserved: int | None = None
    host_ram: int | None = None
    weights_on_device: float | None = None
    note: str = ""
    skipped: str = ""

    @property
    def full_depth_seconds(self) -> float | None:
        if self.seconds_per_step is None:
            return None
        return self.seconds_per_step * self.full_layers / self.layers


def measure(pair: Pair, mode: str, steps: int, device: Device, reserve: float = 0.0, note: str = "") -> Row:
    """One mode on its own: isolated baseline, a one-step warm-up run, the timed run, peaks above the baseline."""
    import comfy.model_management as mm
    phase = pair.phase
    row = Row(phase.label, phase.layers, phase.full_layers, mode, timed_steps(mode, steps), note=note)
    if mode == "replay" and not {1, row.steps} <= set(pair.recordings):
        row.skipped = "skipped: no recording (record did not run)"
        return row
    baseline = device.isolate()
    with HostRamPeak() as ram, reserved_vram(reserve):
        try:
            run = pair.runner(mode)
            run(1)
            row.seconds_per_step = device.timed(lambda: run(row.steps)) / row.steps
            row.weights_on_device = weights_on_device()
        except mm.InterruptProcessingException:
            row.seconds_per_step, row.skipped = None, "skipped: time budget (interrupted at the limit)"
        except Exception as exc:        # one failed mode (out of memory …) must not cost the others their device time
            traceback.print_exc()
            row.seconds_per_step, row.skipped = None, f"failed: {type(exc).__name__}: {first_line(exc)}"
    row.vram_allocated, row.vram_reserved = device.peaks_above(baseline)
    row.host_ram = ram.above_start
    return row


def first_line(exc: Exception) -> str:
    return (str(exc).splitlines() or [""])[0][:160]


def skipped_rows(phase: Phase, modes, steps: int, why: str = "skipped: time budget") -> list[Row]:
    return [Row(phase.label, phase.layers, phase.full_layers, m, timed_steps(m, steps), skipped=why) for m in modes]


def run_phase(phase: Phase, args, device: Device, budget: Budget) -> list[Row]:
    """Both models of the phase, then each of its modes while the budget allows; the models are freed after."""
    setup = expected_phase_setup(phase)
    first = expected_seconds(phase, phase.modes[0], args.steps)
    if not budget.allows(setup + first):
        say(budget, f"{phase.label}, {phase.layers} layers: skipped (time budget)")
        return skipped_rows(phase, phase.modes, args.steps)
    say(budget, f"{phase.label}, {phase.layers} layers: drawing two random models on {args.device} in bf16")
    took = time.monotonic()
    try:
        pair = Pair(phase, args.device, args.projector)
    except Exception as exc:        # the next phase may still fit (a smaller pair)
        traceback.print_exc()
        return skipped_rows(phase, phase.modes, args.steps, f"failed: drawing the models: {type(exc).__name__}: "
                                                            f"{first_line(exc)}")
    budget.done(setup, time.monotonic() - took)
    rows = []
    for mode in phase.modes:
        rows.append(run_mode(pair, mode, args, device, budget))
    del pair
    device.isolate()
    return rows


def run_mode(pair: Pair, mode: str, args, device: Device, budget: Budget) -> Row:
    phase = pair.phase
    expected = expected_seconds(phase, mode, args.steps, partial_card_gb=args.partial_card_gb)
    if not budget.allows(expected):
        say(budget, f"{phase.label}, {mode}: skipped (time budget; expected {expected:.0f} s)")
        return skipped_rows(phase, [mode], args.steps)[0]
    reserve, note = 0.0, ""
    if mode == "live lockstep, partial load":
        reserve, note = partial_load(device, args.partial_card_gb)
    took = time.monotonic()
    row = measure(pair, mode, args.steps, device, reserve, note)
    took = time.monotonic() - took
    budget.done(expected, took)
    say(budget, f"{phase.label}, {phase.layers} layers, {mode}: {cell_seconds(row)} s/step ({took:.0f} s, "
                f"expected on an H100 {expected:.0f} s)")
    return row


def partial_load(device: Device, card_gb: float) -> tuple[float, str]:
    """(bytes to reserve so ComfyUI loads as on a ``card_gb`` card, the row's note); nothing on the CPU,
    where ComfyUI always loads fully."""
    if not device.cuda:
        return 0.0, f"--reserve-vram as for a {card_gb:.0f} GB card: n/a on the CPU"
    reserve = max(0.0, device.total_bytes() - card_gb * GB)
    return reserve, f"--reserve-vram {reserve / GB:.1f}: ComfyUI loads as on a {card_gb:.0f} GB card"


# -- the table -----------------------------------------------------------------------------------
COLUMNS = ("shape", "layers", "mode", "timed steps", "s/step", "s/step at full depth", "VRAM allocated peak (GB)",
           "VRAM reserved peak (GB)", "host RAM peak (GB)", "weights on device", "note")


def gb_cell(nbytes, device_known: bool = True) -> str:
    if nbytes is None:
        return "n/a" if device_known else ""
    return f"{nbytes / GB:.2f}"


def cell_seconds(row: Row) -> str:
    return row.skipped or ("" if row.seconds_per_step is None else f"{row.seconds_per_step:.3f}")


def full_depth_cell(row: Row) -> str:
    if row.full_depth_seconds is None:
        return ""
    if row.layers == row.full_layers:
        return f"{row.full_depth_seconds:.3f} (measured)"
    return f"{row.full_depth_seconds:.3f} (extrapolated ×{row.full_layers}/{row.layers})"


def cells(row: Row) -> list[str]:
    ran = not row.skipped
    on_device = "" if not ran else "unloaded after the run" if row.weights_on_device is None else \
        f"{row.weights_on_device:.0%}"
    return [row.shape, str(row.layers), row.mode, str(row.steps), cell_seconds(row), full_depth_cell(row),
            gb_cell(row.vram_allocated) if ran else "", gb_cell(row.vram_reserved) if ran else "",
            gb_cell(row.host_ram) if ran else "", on_device, row.note]


def table(rows: list[Row]) -> str:
    """The markdown table BENCHMARKS.md's section "On a GPU" holds."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cells(r)) + " |" for r in rows]
    return "\n".join(lines)


def fit_summary(rows: list[Row], device: Device, card_gb: float) -> list[str]:
    """The 14B answer in words: does live lockstep at full depth fit fully loaded, and what partial loading costs."""
    partial = next((r for r in rows if r.mode == "live lockstep, partial load"), None)
    if partial is None:
        return []
    full = next(r for r in rows if r.mode == "live lockstep" and (r.shape, r.layers) == (partial.shape, partial.layers))
    if full.skipped:
        return [f"live lockstep, two {full.layers}-layer {full.shape} models: {full.skipped}"]
    out = []
    if full.seconds_per_step is not None:
        fits = (full.weights_on_device or 0.0) >= 0.999
        memory = (f"peak reserved {gb_cell(full.vram_reserved)} GB above the baseline on a "
                  f"{device.total_bytes() / GB:.0f} GB card" if device.cuda else "device memory n/a on the CPU")
        out.append(f"live lockstep, two {full.layers}-layer {full.shape} models: "
                   f"{'fits' if fits else 'does NOT fit'} fully loaded "
                   f"({full.weights_on_device:.0%} of the weights on the device; {memory})")
    if partial.seconds_per_step is not None and full.seconds_per_step:
        out.append(f"partial loading as on a {card_gb:.0f} GB card (on a GPU): {partial.weights_on_device:.0%} of the "
                   f"weights on the device, {partial.seconds_per_step:.2f} s/step against {full.seconds_per_step:.2f} "
                   f"fully loaded (×{partial.seconds_per_step / full.seconds_per_step:.2f})")
    return out


# -- main ----------------------------------------------------------------------------------------
def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes: the dry run of the same code path")
    ap.add_argument("--steps", type=int, default=2, help="timed steps per mode (refresh 4: at least 4)")
    ap.add_argument("--budget-s", type=float, default=450.0,
                    help="hard limit in seconds: later modes are skipped, a running one interrupted, past it")
    ap.add_argument("--layers-14b", type=int, default=10,
                    help="depth of the 14B-shaped pair the six modes run on (s/step extrapolated to 40)")
    ap.add_argument("--partial-card-gb", type=float, default=48.0,
                    help="partial-loading run: ComfyUI loads as if the card had this much memory")
    ap.add_argument("--projector", default="c2c", help="Create C2C Projector's kind for the bridged modes")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads on --device cpu (0: torch's default); 1 keeps a shared CPU's OpenMP "
                         "from waiting on busy cores (BENCHMARKS.md)")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    return ap.parse_args(argv)


def require_lockstep() -> None:
    """Without greenlet the pack falls back to buffered live with only a log line, and the "live lockstep"
    rows would time another mode (and hold every layer's K/V: out of memory at 14B); stop before the device
    minutes are spent."""
    if importlib.util.find_spec("greenlet") is None:
        raise SystemExit("gpu_check: the Python package greenlet is missing (requirements.txt): live lockstep needs "
                         "it. Install it (BENCHMARKS.md, 'What the GPU machine needs') and run again.")


def main(argv=None) -> list[Row]:
    args = parse(argv)
    require_lockstep()
    budget = Budget(args.budget_s)
    with tempfile.TemporaryDirectory(prefix="c2c_gpu_check_") as tmp:
        setup_host(args.device, Path(tmp))          # ComfyUI's folders; nothing is written there
        rows = run_check(args, budget)
    return rows


def run_check(args, budget: Budget) -> list[Row]:
    """Boot done: the estimate, then every phase under the budget, then the table."""
    import torch
    if args.device == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    device = Device(args.device)
    say(budget, f"device: {device.describe()}")
    print_plan(plan(phases(False, args.layers_14b), args.steps), args.budget_s)
    import comfy.model_management as mm
    import comfy.utils
    bars = comfy.utils.PROGRESS_BAR_ENABLED
    comfy.utils.set_progress_bar_enabled(False)     # a device run returns only its output's last 12,000 characters
    budget.arm(lambda: mm.interrupt_current_processing(True))
    rows = []
    try:
        for phase in phases(args.tiny, args.layers_14b):
            rows += run_phase(phase, args, device, budget)
    finally:
        budget.disarm()
        mm.interrupt_current_processing(False)
        comfy.utils.set_progress_bar_enabled(bars)
    report(rows, args, device, budget)
    return rows


def report(rows: list[Row], args, device: Device, budget: Budget) -> None:
    print(f"\n{device.describe()}; {args.steps} timed steps per mode after a 1-step warm-up, batched CFG {CFG:g}, "
          f"euler, projector {args.projector}; VRAM and host RAM are peaks above the mode's own baseline "
          f"(models unloaded, caches emptied); wall {budget.elapsed():.0f} s\n")
    print(table(rows))
    for line in fit_summary(rows, device, args.partial_card_gb):
        print(f"\n{line}")
    if args.json:
        args.json.write_text(json.dumps({"device": device.describe(), "wall_s": budget.elapsed(),
                                         "rows": [asdict(r) for r in rows]}, indent=1))


if __name__ == "__main__":
    main()
