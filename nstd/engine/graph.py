"""CUDA graphs of the step: one whole L-BFGS step (forward, backward, update, guard) captured
once and replayed for the rest of the stage, one launch instead of hundreds, and the CPU free.
Any failure falls back to eager steps, never to a wrong result."""
from __future__ import annotations

from typing import Callable

import torch

from nstd.engine.device import Device, is_oom

#: Eager steps before a CUDA graph of the step is captured (lazy initialisation happens in them).
WARMUP_STEPS = 3


class CaptureFailed(RuntimeError):
    """The capture failed. `clean`: it ended properly (the step raised inside it, or ran out of
    memory), so the allocator is as before; otherwise CUDA ended it and torch's allocator was told
    only by the best-effort release in record_graph."""

    def __init__(self, cause: BaseException, clean: bool):
        super().__init__(f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}")
        self.cause, self.clean = cause, clean


class StepGraphs:
    """One engine's captures: whether they may be taken, the stream they are taken on, and the
    kinds of step (preserve_color, anchor) whose capture failed, run eagerly from then on."""

    def __init__(self, device: Device, enabled: bool = True):
        self.device = device
        #: on CUDA, capture an L-BFGS step in a graph and replay it (falls back to eager on failure)
        self.enabled = enabled
        self.refused: set[tuple] = set()
        self._stream: "torch.cuda.Stream | None" = None

    def possible(self) -> bool:
        return self.enabled and self.device.is_cuda and self.device.place.type == "cuda"

    def side_stream(self) -> "torch.cuda.Stream":
        """The stream captures are taken on: one per engine (each new stream gets a cuBLAS
        workspace of its own, kept for the life of the process)."""
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=self.device.torch)
        return self._stream

    def capture(self, step: Callable[[], None], warm: Callable[[], None], counter: Callable[[], torch.Tensor],
                kind: tuple = ()) -> "torch.cuda.CUDAGraph | None":
        """A CUDA graph of one whole step, to replay for the rest of the stage. Then replayed once
        as this step and checked: `counter()` (the guard's count of evaluations, a device tensor
        the step adds one to in place) must have grown by one; a graph that captured nothing
        leaves it. None, with one log line, when any of that fails: the run goes on eagerly, never
        with a wrong result (the failed capture ran nothing; its warm-up evaluated the picture,
        which the eager step evaluates again). Out of memory: eager for this stage only. Any other
        failure: steps of this `kind` (colour mode, anchor) are not captured again by this engine,
        and none at all after a capture CUDA had to end under torch."""
        from loguru import logger

        try:
            graph = record_graph(self.device.torch, step, warm, self.side_stream())
            before = int(counter())
            graph.replay()
            if int(counter()) != before + 1:
                raise RuntimeError("the captured step evaluated nothing (an empty graph)")
            return graph
        except Exception as exc:  # an op that cannot be captured, no memory for the pool, an empty graph
            cause = exc.cause if isinstance(exc, CaptureFailed) else exc
            if isinstance(exc, CaptureFailed) and not exc.clean:
                self.enabled = False
                then = "and every step from now on"
            elif is_oom(cause):
                then = "for this stage (no memory for the graph)"
            else:
                self.refused.add(kind)
                then = "and such steps from now on"
            logger.warning("the step cannot be captured in a CUDA graph ({}: {}); running it eagerly, {}",
                           type(cause).__name__, str(cause).splitlines()[0] if str(cause) else "", then)
            return None


def record_graph(dev: torch.device, step: Callable[[], None], warm: Callable[[], None],
                 side: "torch.cuda.Stream") -> "torch.cuda.CUDAGraph":
    """`step` captured in a CUDA graph on `dev`, on the stream `side`, in thread-local mode
    (another worker's GPU calls go on meanwhile), after `warm` ran on that stream (torch's rule:
    a warm-up on a side stream before capture). torch.cuda.graph's recipe (synchronise, empty the
    cache: a capture cannot use blocks cached outside its pool, and the allocator's cap counts
    them) with capture_begin/capture_end by hand, so that the stream is restored however the
    capture ends and a capture that CUDA ended under torch (an op not allowed while capturing)
    gives its memory pool back instead of leaving the allocator in capture mode for good.
    Raises CaptureFailed."""
    with torch.cuda.device(dev):
        main = torch.cuda.current_stream(dev)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            warm()
        main.wait_stream(side)
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
        graph = torch.cuda.CUDAGraph()
        pool = torch.cuda.graph_pool_handle()
        with torch.cuda.stream(side):
            graph.capture_begin(pool=pool, capture_error_mode="thread_local")
            try:
                step()
            except BaseException as exc:
                try:
                    graph.capture_end()
                except Exception:
                    release_pool(dev, pool)
                    raise CaptureFailed(exc, clean=False) from exc
                raise CaptureFailed(exc, clean=True) from exc
            try:
                graph.capture_end()
            except Exception as exc:
                release_pool(dev, pool)
                raise CaptureFailed(exc, clean=False) from exc
        main.wait_stream(side)
    return graph


def release_pool(dev: torch.device, pool) -> None:
    """What capture_end does not do when CUDA refused the end of a capture: stop routing this
    GPU's allocations to the graph's pool, and free the pool (torch's private calls, as
    torch.cuda.use_mem_pool makes them; best effort: a torch without them leaves it as it is)."""
    from loguru import logger

    index = dev.index if dev.index is not None else torch.cuda.current_device()
    for name in ("_cuda_endAllocateToPool", "_cuda_releasePool"):
        try:
            getattr(torch._C, name)(index, pool)
        except Exception as exc:  # noqa: PERF203
            logger.debug("after a failed capture, {} failed: {}", name, exc)
