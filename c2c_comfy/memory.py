"""Ask ComfyUI's memory manager to let go of one model (recorded mode keeps one model resident)."""
import comfy.model_management as mm


def release(patcher) -> int:
    """Unload every loaded copy of ``patcher``'s model; returns how many were unloaded."""
    released = 0
    for i in range(len(mm.current_loaded_models) - 1, -1, -1):
        loaded = mm.current_loaded_models[i]
        if loaded.model is not None and loaded.model.model is patcher.model:
            loaded.model_unload()
            mm.current_loaded_models.pop(i)
            released += 1
    return released


def is_loaded(patcher) -> bool:
    return any(m.model is patcher.model for m in mm.loaded_models())
