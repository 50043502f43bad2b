"""Fuzz the file loaders with mutated real bundles and recordings (run by test_fuzz_files.py).

Run as a script in a fresh interpreter so that its peak resident memory (ru_maxrss) measures only
this work. Each case mutates a real file — its header JSON (hostile values at any metadata path,
tensor entries), raw bytes (flips, truncation, insertion) or tensor data (NaN, Inf, 1e35) — writes
it to a RAM-backed folder and loads it completely (bundles: load_bundle; recordings: load_recording
then every step). Prints one JSON line: cases, outcome counts, cases per mutation class and source
file, the slowest case, peak RSS.
Any exception outside the documented ones (c2c_core.errors.BundleError and subclasses) is a
failure: the script re-raises it with the case that caused it.
"""
from __future__ import annotations

import json
import os
import resource
import struct
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from c2c_core import LayerMap, ModelSignature, ProjectorBank, TokenGrid, save_bundle  # noqa: E402
from c2c_core.align import RopeSpec  # noqa: E402
from c2c_core.bundle import load_bundle  # noqa: E402
from c2c_core.errors import BundleError  # noqa: E402
from c2c_core.recording import KVRecording, RamStore, load_recording, save_recording  # noqa: E402

HOSTILE = st.one_of(
    st.integers(min_value=-2**70, max_value=2**70),
    st.sampled_from([0, -1, 1, 2**31, 2**40, 10**6, 100000, 2**63, 10**400]),
    st.floats(allow_nan=False, allow_infinity=False), st.sampled_from([1e308, -1e308, 1e-320, 0.0]),
    st.booleans(), st.none(), st.text(max_size=20), st.sampled_from(["banana", "", "x" * 5000, "c2c", "fp64"]),
    st.lists(st.integers(-3, 50), max_size=4), st.dictionaries(st.text(max_size=5), st.integers(-2, 9), max_size=3),
)
# Strings the JSON encoder cannot make: spliced into the serialised header verbatim.
RAW_TOKENS = [b"NaN", b"Infinity", b"-Infinity", b"1e400", b"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]",
              b"9" * 5000, b'"\\ud800"', b"{}", b"[]"]


def make_sources(folder: Path) -> dict[str, Source]:
    torch.manual_seed(0)
    sharer, receiver = ModelSignature(2, 2, 4, "s"), ModelSignature(3, 2, 4, "r")
    sources = {}
    for kind, hparams in (("c2c", {"hidden_dim": 4, "num_layers": 1}), ("full", {"hidden_dim": 4}), ("weighted", {"alpha": 0.3, "learnable": True})):
        layer_map = LayerMap.build("terminal", sharer.num_layers, receiver.num_layers, layers=[2])
        bank = ProjectorBank.build(kind, sharer, receiver, layer_map.layers, **hparams)
        save_bundle(folder / f"{kind}.safetensors", bank, layer_map, {"note": "fuzz"})
    for dtype in ("bf16", "fp8_e4m3fn"):
        rec = KVRecording(receiver, TokenGrid(1, 2, 2), RopeSpec(scale=(7.0, 1.0, 1.0)), [1.0, 0.6, 0.0], (0, 2),
                          (0, 1), dtype, RamStore(), seed=3)
        for step in range(2):
            for kind in (0, 1):
                for layer in (0, 2):
                    rec.put(step, kind, layer, torch.randn(1, 4, 8), torch.randn(1, 4, 8))
        save_recording(folder / f"rec_{dtype}.safetensors", rec)
    for path in folder.iterdir():
        sources[path.stem] = Source(path.read_bytes())
    return sources


class Source:
    """A real file taken apart once: header, data section, metadata JSON and every path inside it."""

    def __init__(self, data: bytes):
        n = struct.unpack("<Q", data[:8])[0]
        self.data, self.header, self.body = data, json.loads(data[8:8 + n]), data[8 + n:]
        self.header_len = n
        self.key = next(k for k in self.header["__metadata__"] if k.startswith("c2c"))
        self.meta_text = self.header["__metadata__"][self.key]
        self.paths = [p for p, _ in paths_in(json.loads(self.meta_text))]
        self.tensors = sorted(k for k in self.header if k != "__metadata__")
        self.float_tensors = [k for k in self.tensors if self.header[k]["dtype"] in ("F32", "BF16")]

    def with_meta(self, text: str) -> bytes:
        return join({**self.header, "__metadata__": {self.key: text}}, self.body)

    def with_entries(self, entries: dict, body: bytes | None = None) -> bytes:
        return join(entries, self.body if body is None else body)


def join(header: dict | bytes, body: bytes) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def paths_in(value, prefix=()):
    """Every (path, value) inside a JSON value, containers included."""
    yield prefix, value
    if isinstance(value, dict):
        for k, v in value.items():
            yield from paths_in(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from paths_in(v, prefix + (i,))


def set_path(value, path, new):
    if not path:
        return new
    target = value
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = new
    return value


#: every class of damage the fuzzer does, as reported: hostile metadata values, raw JSON tokens, tensor
#: entries, a dropped tensor, overwritten or inserted bytes, truncation, NaN/Inf/1e35 tensor data
MUTATIONS = ("meta", "raw_token", "entry", "drop", "flip", "insert", "truncate", "data")
#: the cycle of classes every source file goes through (metadata 3× as often)
CYCLE = ("meta", "meta", "meta") + MUTATIONS[1:]


@st.composite
def mutation(draw, sources, name, how):
    """One damaged copy of ``sources[name]`` by mutation class ``how``; hypothesis draws the details."""
    src = sources[name]
    if how in ("meta", "raw_token"):
        path = draw(st.sampled_from(src.paths))
        meta = json.loads(src.meta_text)
        if how == "meta":
            return name, how, src.with_meta(json.dumps(set_path(meta, path, draw(HOSTILE))))
        token = draw(st.sampled_from(RAW_TOKENS)).decode()
        return name, how, src.with_meta(json.dumps(set_path(meta, path, "@@TOKEN@@")).replace('"@@TOKEN@@"', token))
    if how in ("entry", "drop"):
        tensor = draw(st.sampled_from(src.tensors))
        entries = dict(src.header)
        if how == "drop":
            entries.pop(tensor)
        else:
            field = draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
            value = draw(st.one_of(HOSTILE, st.sampled_from(["F64", "I64", "U8", "F8_E5M2", [2**40, 2**40], [0, 2**62]])))
            entries[tensor] = {**entries[tensor], field: value}
        return name, how, src.with_entries(entries)
    if how == "data":
        tensor = draw(st.sampled_from(src.float_tensors))
        entry = src.header[tensor]
        begin, end = entry["data_offsets"]
        fill = draw(st.sampled_from([float("nan"), float("inf"), 1e35]))
        dtype = torch.float32 if entry["dtype"] == "F32" else torch.bfloat16
        raw = torch.full(((end - begin) // dtype.itemsize,), fill, dtype=dtype).view(torch.uint8).numpy().tobytes()
        return name, how, src.with_entries(src.header, src.body[:begin] + raw + src.body[end:])
    data = src.data
    if how == "truncate":
        return name, how, data[:draw(st.integers(0, len(data) - 1))]
    pos = draw(st.integers(0, min(len(data) - 1, 16 + src.header_len)))
    chunk = draw(st.binary(min_size=1, max_size=8))
    if how == "flip":
        return name, how, data[:pos] + chunk + data[pos + len(chunk):]
    return name, how, data[:pos] + chunk + data[pos:]


def load_completely(path: Path, name: str):
    if name.startswith("rec"):
        rec = load_recording(path)
        for step in range(rec.steps):
            for kind in rec.kinds:
                for layer in rec.layers:
                    rec.get(step, kind, layer)
        return rec
    return load_bundle(path)


BATCH = 20


def main(cases: int) -> None:
    folder = Path(tempfile.mkdtemp(prefix="c2c_fuzz_", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
    sources = make_sources(folder)
    target = folder / "case.safetensors"
    outcomes: dict[str, int] = {}
    per_class: dict[str, int] = {}
    slowest = [0.0, ""]
    torch.set_num_threads(1)

    def one(name, how, data):
        target.write_bytes(data)
        start = time.perf_counter()
        try:
            load_completely(target, name)
            outcome = "loaded"
        except BundleError as e:
            outcome = type(e).__name__
            assert len(str(e)) < 2000, f"{how} on {name}: a {len(str(e))}-character message"
        except Exception as e:
            raise AssertionError(f"{how} on {name}: undocumented {type(e).__name__}: {str(e)[:300]}") from e
        took = time.perf_counter() - start
        if took > slowest[0]:
            slowest[:] = [took, f"{how} on {name}"]
        key = f"{how}:{outcome}"
        outcomes[key] = outcomes.get(key, 0) + 1
        per_class[f"{how}@{name}"] = per_class.get(f"{how}@{name}", 0) + 1

    # every (class, source file) pair gets its share (metadata 3×), so even a short run covers them all;
    # BATCH cases per hypothesis example: the engine's per-example bookkeeping costs more than a case
    weights = {how: CYCLE.count(how) for how in MUTATIONS}
    share = -(-cases // (len(CYCLE) * len(sources)))

    def fuzz(name, how):
        @settings(max_examples=-(-share * weights[how] // BATCH), deadline=None, database=None, derandomize=True,
                  report_multiple_bugs=False, suppress_health_check=list(HealthCheck))
        @given(st.lists(mutation(sources, name, how), min_size=BATCH, max_size=BATCH))
        def case(batch):
            for m in batch:
                one(*m)
        case()

    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    try:
        for how in MUTATIONS:
            for name in sorted(sources):
                fuzz(name, how)
    finally:
        for path in folder.iterdir():
            path.unlink()
        folder.rmdir()
    print(json.dumps({"cases": sum(outcomes.values()), "outcomes": outcomes, "per_class": per_class,
                      "mutations": MUTATIONS, "sources": sorted(sources), "slowest_s": slowest[0],
                      "slowest_case": slowest[1], "baseline_rss_mb": baseline,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 10000)
