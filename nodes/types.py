"""The pack's socket types, shared by every node file."""
from comfy_api.latest import io

CATEGORY = "DiT Cache Bridge"

Projector = io.Custom("C2C_PROJECTOR")
KVSource = io.Custom("C2C_KV_SOURCE")
