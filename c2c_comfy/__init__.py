"""The bridge for ComfyUI: attaches K/V sources to clones of a receiver, records and replays, trains.

No node schemas live here (see ``nodes/``) and no fusion math (see ``c2c_core``). Every ComfyUI
internal this package touches goes through ``compat``.
"""
