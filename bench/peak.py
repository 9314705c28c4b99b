"""Run a console script (nstd, pastiche) in this process and report its peak memory on exit.

    python bench/peak.py .venv/bin/pastiche --content ... --device cuda

The script runs exactly as its command would (runpy, `__main__`); at exit one line goes to stderr:
`PEAK cuda_bytes=<torch.cuda.max_memory_allocated> rss_bytes=<peak RSS>`. Both tools are measured
the same way, which a number from each tool's own report would not give.
"""
from __future__ import annotations

import resource
import runpy
import sys


def main() -> int:
    script, args = sys.argv[1], sys.argv[2:]
    sys.argv = [script, *args]
    code = 0
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        import torch

        cuda = max((torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count())), default=0) \
            if torch.cuda.is_initialized() else 0  # the GPU the tool used, whichever it was
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(f"PEAK cuda_bytes={cuda} rss_bytes={rss}", file=sys.stderr, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
