"""The demo's embedded default: the miniature's trained tiny pair and c2c projector, made once.

Together they are over 20 MB, so instead of shipping them ``make demo`` regenerates them with a fixed
seed (``experiments/miniature.py: make_demo_assets``, seed 0 of the evidence experiment) into a
git-ignored folder and links them where the demo's ComfyUI finds them:

    <models root>/demo/                      the files and stamp.json (version, settings, timings)
    <models root>/diffusion_models/demo_wan_t2v_receiver.safetensors  -> ../demo/...
    <models root>/diffusion_models/demo_wan_i2v_sharer.safetensors    -> ../demo/...
    <models root>/c2c_projectors/demo_c2c_projector.safetensors       -> ../demo/...

A second call finds the stamp and only re-links (instant). Runs in a subprocess of the demo, so the
demo's own process stays free of ComfyUI imports.

    python tools/make_demo_assets.py [--root .models] [--quick] [--force] [--check]

``--quick`` (the tests' setting) keeps its own root, ``.models/demo-quick``, so it never replaces the
full assets: tests/test_demo_assets.py trains it once and every later run, on every host, finds the stamp.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ROOT = REPO_ROOT / ".models"
QUICK_ROOT = DEFAULT_ROOT / "demo-quick"       # --quick's default: beside the full assets, never over them
SUBFOLDER = "demo"
STAMP = "stamp.json"
# Bump when the recipe changes in a way the settings do not show (data, training code): forces a rebuild.
VERSION = 1
LINK_FOLDERS = {"receiver": "diffusion_models", "sharer": "diffusion_models", "projector": "c2c_projectors"}


def miniature():
    if str(REPO_ROOT / "experiments") not in sys.path:
        sys.path.insert(0, str(REPO_ROOT / "experiments"))
    import miniature as module
    return module


def settings_for(quick: bool):
    m = miniature()
    return m.Settings.quick() if quick else m.Settings.demo()


def wanted_stamp(quick: bool) -> dict:
    return {"version": VERSION, "seed": 0, "quick": quick, "settings": asdict(settings_for(quick))}


def linked_paths(root: Path) -> dict:
    """Where the server's folders see each asset, by role (receiver, sharer, projector)."""
    return {role: root / LINK_FOLDERS[role] / name for role, name in miniature().DEMO_FILES.items()}


def up_to_date(root: Path, quick: bool = False) -> dict | None:
    """The stamp when the assets in ``root/demo`` were made by this recipe and all exist, else None."""
    folder = Path(root) / SUBFOLDER
    try:
        stamp = json.loads((folder / STAMP).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if {k: stamp.get(k) for k in ("version", "seed", "quick", "settings")} != json.loads(json.dumps(wanted_stamp(quick))):
        return None
    if not all((folder / name).is_file() for name in miniature().DEMO_FILES.values()):
        return None
    return stamp


def link(root: Path) -> dict:
    """(Re)make the links from the server's model folders to the files in root/demo; returns them."""
    folder = Path(root) / SUBFOLDER
    links = linked_paths(Path(root))
    for role, path in links.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_symlink() or path.exists():
            path.unlink()
        path.symlink_to(os.path.relpath(folder / path.name, path.parent))
    return links


def ensure(root: Path = DEFAULT_ROOT, quick: bool = False, force: bool = False, log=print) -> dict:
    """Make the assets unless up to date, link them; returns the stamp (with ``links`` added)."""
    root = Path(root).resolve()
    stamp = None if force else up_to_date(root, quick)
    if stamp is None:
        folder = root / SUBFOLDER
        folder.mkdir(parents=True, exist_ok=True)
        (folder / STAMP).unlink(missing_ok=True)
        log(f"[demo assets] training the tiny pair and a c2c projector into {folder} "
            f"({'quick' if quick else 'a few minutes on 2 CPU cores, once'}) ...")
        started = time.monotonic()
        made = miniature().make_demo_assets(folder, settings_for(quick), seed=0, threads=max(1, min(2, os.cpu_count() or 1)),
                                            log=lambda message: log(f"[demo assets] {message.strip()}"))
        stamp = {**wanted_stamp(quick), "seconds": {**made["seconds"], "total": time.monotonic() - started},
                 "base_loss": made["base_loss"], "made": time.strftime("%Y-%m-%d %H:%M:%S")}
        (folder / STAMP).write_text(json.dumps(stamp, indent=1), encoding="utf-8")
        log(f"[demo assets] done in {stamp['seconds']['total']:.0f} s")
    stamp["links"] = {role: str(path) for role, path in link(root).items()}
    return stamp


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=None,
                        help="ComfyUI models root (default .models, with --quick .models/demo-quick)")
    parser.add_argument("--quick", action="store_true", help="tiny training (under a minute; the effect is not there)")
    parser.add_argument("--force", action="store_true", help="retrain even when the stamp is up to date")
    parser.add_argument("--check", action="store_true", help="train nothing; exit 0 when up to date, 1 when not")
    args = parser.parse_args(argv)
    if args.root is None:
        args.root = QUICK_ROOT if args.quick else DEFAULT_ROOT
    if args.check:
        return 0 if up_to_date(args.root, args.quick) else 1
    stamp = ensure(args.root, args.quick, args.force, log=lambda message: print(message, flush=True))
    print(json.dumps(stamp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
