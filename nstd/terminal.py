"""How `nstd stylize` reports while it runs: a bar on a terminal, lines in a log.

A tqdm bar turns itself off when stderr is not a terminal (`2> log`, cron, a CI job), and a 1024 px
run then said nothing for 13 minutes. Without a terminal, `Lines` writes a line when each stage
starts and ends (its size, steps, seconds and peak memory) and one at least every `every` seconds
(the step, the loss and the time left), from inside long passes too. Both are the engine's
Progress.
"""
from __future__ import annotations

import resource
import sys
import time
from typing import Callable, TextIO


def reporter(total: int, stages: list, quiet: bool, every: float, peak: Callable[[], int | None],
             peak_name: str = "peak memory", stream: TextIO | None = None):
    """The bar on a terminal, `Lines` elsewhere; nothing at all with --quiet. `peak()` is the
    memory figure a stage's line shows, under `peak_name`."""
    stream = stream or sys.stderr
    if quiet or stream.isatty():
        return Bar(total, disabled=quiet)
    return Lines(stages, every, peak, stream, peak_name)


def peak_rss() -> int:
    """This process's peak resident memory so far, bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _mib(n: int | None) -> str:
    return "?" if n is None else f"{n / 2**20:.0f} MiB"


def _clock(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class _Silent:
    """Progress's hooks a caller of `stylize` does not use."""

    def checkpoint_due(self, step: int) -> bool:
        return False

    def on_checkpoint(self, checkpoint) -> None:
        pass

    def should_stop(self) -> bool:
        return False

    def alive(self) -> None:
        pass


class Bar(_Silent):
    """A tqdm bar; losses are read only every few steps."""

    def __init__(self, total: int, disabled: bool):
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="step", disable=disabled or None, dynamic_ncols=True, leave=False)
        self.every = max(1, total // 50)

    def on_step(self, info) -> None:
        self.bar.update(1)
        if self.bar.disable or not (info.step % self.every == 0 or info.step == info.steps):
            return
        got = info.recent_losses()  # on a GPU: the newest landed, no sync
        if got is not None:
            self.bar.set_postfix(loss=f"{got[1]['total']:.4g}", refresh=False)

    def close(self) -> None:
        self.bar.close()


class Lines(_Silent):
    """A line per stage, started and done, and one at least every `every` seconds."""

    def __init__(self, stages: list, every: float, peak: Callable[[], int | None], stream: TextIO,
                 peak_name: str = "peak memory"):
        self.stages, self.every, self.peak, self.stream, self.peak_name = stages, every, peak, stream, peak_name
        self.ends = [sum(s.steps for s in stages[:i + 1]) for i in range(len(stages))]
        self.total = self.ends[-1] if self.ends else 0
        self.t0 = self.t_stage = self.last = time.monotonic()
        self.stage = 0
        self.step, self.loss, self.eta = 0, None, None
        self._started(0)

    def _say(self, text: str) -> None:
        self.stream.write(f"nstd: {text}\n")
        self.stream.flush()
        self.last = time.monotonic()

    def _where(self) -> str:
        return f"stage {self.stage + 1}/{len(self.stages)}" if len(self.stages) > 1 else "one stage"

    def _started(self, index: int) -> None:
        if index < len(self.stages):
            st = self.stages[index]
            self._say(f"{self._where()}: {st.size} px, {st.steps} steps, started")

    def on_step(self, info) -> None:
        self.step, self.eta = info.step, info.eta
        got = info.recent_losses()
        if got is not None:
            self.loss = got[1]["total"]
        if self.stage < len(self.ends) and info.step >= self.ends[self.stage]:
            now = time.monotonic()
            st = self.stages[self.stage]
            self._say(f"{self._where()}: {st.size} px done, {st.steps} steps in {now - self.t_stage:.1f} s, "
                      f"{self.peak_name} {_mib(self.peak())}")
            self.stage, self.t_stage = self.stage + 1, now
            self._started(self.stage)
        elif time.monotonic() - self.last >= self.every:
            self._tick()

    def alive(self) -> None:
        """Inside a long pass (a style target, a tile): still a line every `every` seconds."""
        if time.monotonic() - self.last >= self.every:
            self._tick()

    def _tick(self) -> None:
        loss = f", loss {self.loss:.4g}" if self.loss is not None else ""
        eta = f", about {_clock(self.eta)} left" if self.eta else ""
        self._say(f"step {self.step}/{self.total} ({self._where()}){loss}, {_clock(time.monotonic() - self.t0)} "
                  f"elapsed{eta}")

    def close(self) -> None:
        pass
