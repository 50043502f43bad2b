"""What the demo queues: the shipped workflow as three API prompts on tiny models.

``demo_prompts`` converts ``workflows/wan21_t2v_with_chronoedit_sharer.json`` to an API prompt with tiny
models substituted for the 14B ones (``workflow_api.py``) and derives the three runs: the receiver alone
(Fuse Caches strength 0, bit-identical to plain sampling), the sharer alone (the stock KSampler with the
sharer's own conditioning) and the bridged workflow as shipped. The trained default (the miniature
experiment's tiny pair and c2c projector, made once by ``make_demo_assets.py``) is plugged in here and
only here; without it the untrained tiny models and a training-free weighted projector stand in.
"""
from __future__ import annotations

import copy
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import make_demo_assets as demo_assets
import workflow_api

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_WORKFLOW = REPO_ROOT / "workflows" / "wan21_t2v_with_chronoedit_sharer.json"


class DemoError(RuntimeError):
    """Something the demo cannot recover from; the message says what to do."""


@dataclass(frozen=True)
class DemoSettings:
    width: int = 128
    height: int = 128
    length: int = 9          # video frames: 9 -> 3 latent frames
    steps: int = 8
    tile_scale: int = 12     # each latent pixel becomes a tile_scale x tile_scale block in comparison.png
    timeout: float = 600.0   # per prompt

    videos: tuple = (0,)     # trained default only: which of the miniature's held-out test videos to show

    @classmethod
    def fast(cls) -> "DemoSettings":
        """For the tests: the smallest latent that still has two frames."""
        return cls(width=64, height=64, length=5, steps=2, tile_scale=8, timeout=300.0)

    @classmethod
    def trained(cls) -> "DemoSettings":
        """The trained tiny pair's own size (8 x 8 latent, 3 latent frames) and the experiment's 12 steps."""
        return cls(width=64, height=64, length=9, steps=12, tile_scale=20, videos=DEMO_VIDEOS)


# --------------------------------------------------------------------------------------------------
# The demo's default: THE ONE PLACE where the embedded trained pair and projector get plugged in.
# By default the demo runs the miniature experiment's trained tiny pair (T2V receiver, I2V sharer)
# and its trained c2c projector, made once by tools/make_demo_assets.py into .models/demo/ and linked
# into the server's diffusion_models/ and c2c_projectors/ folders. The graph stays the shipped
# workflow; use_trained_default() swaps in those files, the conditioning the pair was trained with
# (Test: demo moving squares) and the experiment's sampling (shift 3, euler, cfg 1).
# Without them (--no-train and nothing made yet) the demo falls back to the untrained seeded tiny
# models and the training-free weighted projector below.
# --------------------------------------------------------------------------------------------------
FALLBACK_PROJECTOR = {"kind": "weighted", "mapping": "identity", "layers": "all", "alpha": 0.5}
DEMO_VIDEOS = (1, 10, 12, 14)  # held-out test videos (seed 0), picked for visible squares; 0-15 score alike


@dataclass(frozen=True)
class TrainedDefault:
    """The trained assets as the server names them (file names in its model folders) and how they were made."""
    receiver: str
    sharer: str
    projector: str
    stamp: dict

    @classmethod
    def from_stamp(cls, stamp: dict) -> "TrainedDefault":
        names = {role: Path(path).name for role, path in stamp["links"].items()}
        return cls(names["receiver"], names["sharer"], names["projector"], stamp)


def trained_default(models_root: Path, generate: bool, log=print) -> TrainedDefault | None:
    """The trained default, made first when missing and ``generate``; None when missing and not ``generate``.

    Runs tools/make_demo_assets.py in a subprocess (so this process stays free of ComfyUI imports);
    when the stamp is up to date that only re-links the files.
    """
    if not generate and demo_assets.up_to_date(models_root) is None:
        return None
    command = [sys.executable, str(REPO_ROOT / "tools" / "make_demo_assets.py"), "--root", str(models_root)]
    stamp = None
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as process:
        for line in process.stdout:
            if line.startswith("{"):
                stamp = json.loads(line)
            elif line.startswith("[demo assets]"):
                log(line.rstrip())
    if process.returncode != 0 or stamp is None:
        raise DemoError(f"tools/make_demo_assets.py failed (exit {process.returncode}); run it alone to see why, or "
                        "pass --no-train for the untrained fallback")
    return TrainedDefault.from_stamp(stamp)


def use_default_projector(api: dict, trained: TrainedDefault | None) -> str:
    """Point every projector of the prompt at the demo's default; returns a one-line description."""
    if trained is None:
        for node_id in workflow_api.nodes_of_type(api, "DiTCacheBridge_CreateC2CProjector"):
            api[node_id]["inputs"].update(FALLBACK_PROJECTOR)
        return "Create C2C Projector, " + ", ".join(f"{k} {v}" for k, v in FALLBACK_PROJECTOR.items())
    for node_id in workflow_api.nodes_of_type(api, "DiTCacheBridge_CreateC2CProjector"):
        api[node_id] = {"class_type": "DiTCacheBridge_LoadC2CProjector", "_meta": {"title": "Load C2C Projector (demo default)"},
                        "inputs": {"projector_name": trained.projector}}
    return f"Load C2C Projector {trained.projector} (c2c, trained by tools/make_demo_assets.py)"


def use_trained_default(api: dict, trained: TrainedDefault, ids: dict, settings: DemoSettings) -> None:
    """Swap the trained pair, its training conditioning and the experiment's sampling into the tiny prompt."""
    mini = demo_assets.miniature()
    for node_id, name in ((ids["receiver_loader"], trained.receiver), (ids["sharer_loader"], trained.sharer)):
        api[node_id]["inputs"]["unet_name"] = name
    for node_id in workflow_api.nodes_of_type(api, "ModelSamplingSD3"):
        api[node_id]["inputs"]["shift"] = mini.SHIFT
    for node_id in workflow_api.nodes_of_type(api, "ScaleROPE"):       # ChronoEdit's scale_t 7: not trained with
        api[node_id]["inputs"].update(scale_x=1.0, shift_x=0.0, scale_y=1.0, shift_y=0.0, scale_t=1.0, shift_t=0.0)
    squares = "demo_moving_squares"
    api[squares] = {"class_type": "DCBDemoMovingSquares", "_meta": {"title": "Test: demo moving squares"},
                    "inputs": {"videos": ",".join(str(v) for v in settings.videos)}}
    sampler = api[ids["sampler"]]["inputs"]
    sampler.update(positive=[squares, 1], negative=[squares, 2], cfg=1.0, sampler_name="euler", scheduler="simple")
    api[sampler["latent_image"][0]]["inputs"]["batch_size"] = len(settings.videos)
    capture = api[ids["capture"]]["inputs"]
    for which, slot in (("positive", 1), ("negative", 2)):
        image = api[capture[which][0]]
        if image["class_type"] != "DCBTestWanImageConditioning":
            raise DemoError(f"the sharer's {which} conditioning comes from {image['class_type']}, expected the "
                            "stand-in of WanImageToVideo (DCBTestWanImageConditioning)")
        image["inputs"].update(conditioning=[squares, slot], start_latent=[squares, 0], clip_seed=-1, known_frames=1)


def demo_prompts(workflow: dict, object_info: dict, settings: DemoSettings,
                 trained: TrainedDefault | None = None) -> tuple[dict, dict]:
    """The three API prompts (by run key) and facts about the graph for the report."""
    api = workflow_api.to_api(workflow, object_info)
    real_names = {i: n["inputs"]["unet_name"] for i, n in api.items() if n["class_type"] == "UNETLoader"}
    tiny = workflow_api.substitute_tiny(api, workflow_api.TinySettings(
        width=settings.width, height=settings.height, length=settings.length, steps=settings.steps,
        save_prefix="dit_cache_bridge_demo"), object_info)

    (fuse_id,) = workflow_api.nodes_of_type(tiny, "DiTCacheBridge_FuseCaches")
    capture_id = tiny[fuse_id]["inputs"]["kv_source"][0]
    (sampler_id,) = [i for i in workflow_api.nodes_of_type(tiny, "KSampler")
                     if tiny[i]["inputs"]["model"] == [fuse_id, 0]]
    (save_id,) = [i for i in workflow_api.nodes_of_type(tiny, "SaveLatent")
                  if tiny[i]["inputs"]["samples"] == [sampler_id, 0]]
    ids = {"sampler": sampler_id, "capture": capture_id,
           "receiver_loader": _loader_of(tiny, tiny[fuse_id]["inputs"]["model"]),
           "sharer_loader": _loader_of(tiny, tiny[capture_id]["inputs"]["sharer"])}
    projector = use_default_projector(tiny, trained)
    if trained is not None:
        use_trained_default(tiny, trained, ids, settings)
        tiny = workflow_api.keep_needed(tiny, object_info)

    receiver = copy.deepcopy(tiny)
    receiver[fuse_id]["inputs"]["strength"] = 0.0
    sharer = copy.deepcopy(tiny)
    capture = tiny[capture_id]["inputs"]
    sharer[sampler_id]["inputs"].update(model=capture["sharer"], positive=capture["positive"],
                                        negative=capture["negative"])
    sharer = workflow_api.keep_needed(sharer, object_info)
    prompts = {"receiver": receiver, "sharer": sharer, "bridged": tiny}
    for key, prompt in prompts.items():
        prompt[save_id]["inputs"]["filename_prefix"] = f"dit_cache_bridge_demo/{key}"

    facts = {
        "save_id": save_id, "fuse_id": fuse_id, "sampler": tiny[sampler_id]["inputs"],
        "strength": tiny[fuse_id]["inputs"]["strength"], "projector": projector,
        "receiver_loader": ids["receiver_loader"], "sharer_loader": ids["sharer_loader"], "real_names": real_names,
    }
    return prompts, facts


def _loader_of(api: dict, link) -> str:
    """The UNETLoader a MODEL link comes from (through ModelSamplingSD3, ScaleROPE ...)."""
    node_id = link[0]
    while api[node_id]["class_type"] != "UNETLoader":
        node_id = api[node_id]["inputs"]["model"][0]
    return node_id
