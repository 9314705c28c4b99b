"""What report.json says about a run, from the engine's Result: shared by the daemon's outbox and
`nstd stylize --report`, so that a script reads the same keys from either."""
from __future__ import annotations

import platform

from nstd import __version__


def run_fields(result, steps: int) -> dict:
    """The engine's facts about one run (nstd.engine.Result). `steps` is the job key as the job
    file and job.yaml hold it (the first stage's steps); `steps_total` is every stage's the engine
    ran (stages too small for the content are dropped: docs/big-prints.md); `steps_run` is this
    attempt's share of them (less after a resume)."""
    import torch

    return {
        "steps": steps,
        "steps_total": result.steps,
        "resumed_from_step": result.resumed_from or None,
        "steps_run": result.steps - result.resumed_from,
        "losses": result.losses,
        "device": result.device,
        "device_name": result.device_name,
        "precision": result.precision,
        "cuda_graph": result.cuda_graph,
        # the picture's passes through VGG-19, each over 512 x 512 pixels (docs/quality.md)
        "e512": result.e512,
        "size_used": list(result.size),
        "peak_memory_bytes": result.peak_memory_bytes,
        # coarse to fine: each stage's size, steps, seconds, peak memory (CUDA), and the memory
        # techniques it used (activation checkpointing, tiles, a shorter L-BFGS history) and why
        "stages": result.stages,
        # with masks (job keys style[i].mask, keep): the share of the picture each style covers, kept,
        # and covered by no mask (kept too)
        **({"regions": result.regions} if getattr(result, "regions", None) is not None else {}),
        "versions": {"nstd": __version__, "torch": torch.__version__, "python": platform.python_version()},
    }
