"""The demo's report.txt: what ran on which models, how long it took, how close it came, where the files are."""
from __future__ import annotations

from pathlib import Path

from demo_events import REPORT_EVENT
from demo_graph import DEMO_WORKFLOW, REPO_ROOT
from demo_pictures import layer_value
from make_tiny_models import I2V, T2V_A, TinyModels


def report_text(runs, facts, report, stats, settings, models, startup, server_dir, total, comparison, layers,
                trained=None, psnr=None) -> str:
    sampler = facts["sampler"]
    shape = tuple(runs[0].latent.shape)
    lines = [
        "DiT Cache Bridge demo",
        "=====================",
        f"workflow   {DEMO_WORKFLOW.relative_to(REPO_ROOT)} (tiny models substituted by tools/workflow_api.py)",
        f"latent     {settings.width}x{settings.height}, {settings.length} frames -> {shape}; "
        f"{sampler['steps']} steps, {sampler['sampler_name']}/{sampler['scheduler']}, cfg {sampler['cfg']}, "
        f"seed {sampler['seed']}",
        f"projector  {facts['projector']}; Fuse Caches strength {facts['strength']}",
        "",
    ]
    prompt = runs[-1].prompt
    if trained is not None:
        stamp = trained.stamp
        seconds = stamp.get("seconds", {})
        lines += [f"models (the trained default: experiments/miniature.py seed {stamp['seed']}, made by "
                  f"tools/make_demo_assets.py on {stamp.get('made', '?')} in {seconds.get('total', 0):.0f} s; "
                  f"{Path(stamp['links']['receiver']).parent.parent / 'demo'})"]
        for role, loader, start in (("receiver", facts["receiver_loader"], T2V_A),
                                    ("sharer", facts["sharer_loader"], I2V)):
            name = prompt[loader]["inputs"]["unet_name"]
            spec = TinyModels.spec(start)
            lines.append(f"  {role:<9} {name:<34} {spec['model_type'].upper()} dim {spec['dim']}, {spec['num_layers']} "
                         f"layers, trained from {start} (final loss {stamp['base_loss'][role]:.3f})  "
                         f"(for {facts['real_names'][loader]})")
        lines.append(f"  projector {trained.projector:<34} c2c, {stamp['settings']['projector_steps']} steps of the "
                     "pack's trainer (velocity loss)")
        lines += ["  conditioning: Test: demo moving squares, held-out test videos "
                  f"{', '.join(str(v) for v in settings.videos)} (text = motion direction; the sharer also gets "
                  "the first frame)"]
    else:
        lines += ["models (UNTRAINED tiny seeded stand-ins, tools/make_tiny_models.py: no trained default was found "
                  "and --no-train was given; run tools/demo.py without --no-train to make it, a few minutes once)"]
        for role, loader in (("receiver", facts["receiver_loader"]), ("sharer", facts["sharer_loader"])):
            name = prompt[loader]["inputs"]["unet_name"]
            spec = TinyModels.spec(name)
            size_mb = models.path(name).stat().st_size / 1e6
            lines.append(f"  {role:<9} {name:<28} {spec['model_type'].upper()} dim {spec['dim']}, {spec['num_layers']} "
                         f"layers x {spec['num_heads']} heads, {size_mb:.1f} MB  (for {facts['real_names'][loader]})")
    lines += ["", f"runs (wall time from POST /prompt to done; server startup {startup:.1f} s)"]
    for run in runs:
        lines.append(f"  {run.label:<15} {run.seconds:7.2f} s   {run.latent_path}")
    if psnr is not None:
        lines += ["", "first-frame PSNR vs the ground truth (dB, model space, peak = value range of the 64 held-out "
                      "videos, as experiments/miniature.py)",
                  "  " + f"{'':<15} {'mean':>6}  " + "  ".join(f"video {v:>2}" for v in settings.videos)]
        for run in runs:
            values = psnr[run.key]
            lines.append(f"  {run.label:<15} {sum(values) / len(values):6.2f}  "
                         + "  ".join(f"{v:8.2f}" for v in values))
        r, s_, b = (sum(psnr[k]) / len(psnr[k]) for k in ("receiver", "sharer", "bridged"))
        if s_ != r:
            lines.append(f"  the bridge closes {100 * (b - r) / (s_ - r):.0f} % of the receiver -> sharer gap in dB "
                         "on these videos (experiments/RESULTS.md: about 70 % over 16 videos x 3 seeds)")
    lines += ["", f"fusion report of the bridged run (websocket event {REPORT_EVENT}, Fuse Caches node "
                  f"{facts['fuse_id']}): {report['sharer_forwards']} sharer forwards, {report['model_calls']} "
                  "receiver model calls",
              "  layer  strength  K change  V change"]
    for layer in report["layers"]:
        strength, k, v = (layer_value(report, key, layer) for key in ("strength", "k_change", "v_change"))
        lines.append(f"  {layer:>5}  {strength:8.3f}  {k:8.4f}  {v:8.4f}")
    lines += ["",
              f"bridged vs receiver alone, preview RGB: mean |difference| {stats['mean_abs_diff']:.4g}, "
              f"max {stats['max_abs_diff']:.4g}",
              "",
              "files",
              f"  {comparison}",
              f"  {layers}",
              f"  server folders and log: {server_dir}",
              "",
              f"total demo wall time {total:.1f} s"]
    return "\n".join(lines) + "\n"
