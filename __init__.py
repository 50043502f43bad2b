"""DiT Cache Bridge: let one Diffusion Transformer borrow another's K/V cache at sampling time.

ComfyUI entry point. ComfyUI-specific imports happen in ``comfy_entrypoint`` so that the
framework-free ``c2c_core`` package can be imported on its own.
"""
WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    from .nodes import extension
    return extension()
