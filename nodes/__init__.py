"""ComfyUI glue of DiT Cache Bridge: thin nodes over c2c_core."""
from comfy_api.latest import ComfyExtension

from ..c2c_comfy import paths
from .capture import CaptureKVCache
from .fuse import FuseCaches
from .kv_cache import LoadKVCache, SaveKVCache
from .projector import CreateC2CProjector, LoadC2CProjector
from .record import RecordKVCache
from .sampler import BridgedKSampler
from .text_encode import BridgedQwenTextEncode
from .text_train import SaveC2CTextTrainingSample, TrainC2CTextProjector
from .train import SaveC2CTrainingSample, TrainC2CProjector

NODES = [LoadC2CProjector, CreateC2CProjector, CaptureKVCache, FuseCaches, BridgedKSampler, RecordKVCache, SaveKVCache,
         LoadKVCache]
NODES += [SaveC2CTrainingSample, TrainC2CProjector]
NODES += [BridgedQwenTextEncode]
NODES += [SaveC2CTextTrainingSample, TrainC2CTextProjector]


class DiTCacheBridge(ComfyExtension):
    async def get_node_list(self):
        return list(NODES)


def extension() -> DiTCacheBridge:
    paths.register()
    return DiTCacheBridge()
