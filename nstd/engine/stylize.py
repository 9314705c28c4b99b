"""The Gatys et al. optimisation: one image, optimised in RGB 0..1 against VGG-19 features.

`Engine` owns the network (loaded once) and runs jobs one after another, stage by stage
(stageloop.py). A "step" is one forward+backward evaluation: L-BFGS runs one iteration per step
(no line search), Adam one update.
"""
from __future__ import annotations

import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, ContextManager, Sequence

import torch
from PIL import Image

from nstd.engine import images, schedule
from nstd.engine.anchor import anchor_hw
from nstd.engine.color import Palette
from nstd.engine.device import Device, pick_precision
from nstd.engine.device import resolve as resolve_device
from nstd.engine.graph import StepGraphs
from nstd.engine.losses import GRAM
from nstd.engine.memory import Techniques, choose, fit_size, predict_peak_bytes, target_tile
from nstd.engine.params import Result, StyleParams
from nstd.engine.progress import Checkpoint, OnStep, Progress, StepInfo
from nstd.engine.readbehind import FRAME_BYTES_MAX, Frames, LossTap, _frame_size, frame_of, frames_max
from nstd.engine.run import Run
from nstd.engine.schedule import Stage, style_edge
from nstd.engine.stageloop import StageLoop
from nstd.engine.styleloss import refuse_tiles, style_kind
from nstd.engine.targets import StyleImage, TargetCache
from nstd.engine.tiles import Tiler
from nstd.engine.vgg import Network, layer_index


class Engine:
    """A loaded network on one device, ready to run stylizations one at a time."""

    def __init__(
        self,
        weights: str = "vgg19-caffe",
        weights_file: Path | None = None,
        device: str | Device = "auto",
        precision: str = "auto",
        lbfgs_history: int = 20,
        cuda_graphs: bool = True,
    ):
        self.device = resolve_device(device)
        self.precision = pick_precision(precision, self.device)
        self.weights = weights
        self.lbfgs_history = lbfgs_history
        #: on CUDA, each L-BFGS step captured in a graph and replayed (eager where that fails)
        self.graphs = StepGraphs(self.device, enabled=cuda_graphs)
        #: on CUDA, GIF frames are copied behind the queued steps and converted later (readbehind.Frames)
        self.async_frames = True
        self.device.allow_tf32()
        self.network = Network.load(weights, weights_file, self.device.place)

    @property
    def cuda_graphs(self) -> bool:
        """Whether steps may be captured in CUDA graphs (off after a capture CUDA had to end)."""
        return self.graphs.enabled

    @cuda_graphs.setter
    def cuda_graphs(self, on: bool) -> None:
        self.graphs.enabled = on

    def autocast(self, capturing: bool = False) -> ContextManager:
        """The precision's autocast for a pass (bf16), or nothing (fp32)."""
        if self.precision == "bf16":
            # A graph must not capture autocast's cache of cast weights (torch's documented rule).
            return torch.autocast(self.device.place.type, dtype=torch.bfloat16, cache_enabled=not capturing)
        return nullcontext()

    @torch.no_grad()
    def style_grams(
        self, style: Image.Image, long_edge: int, layers: Sequence[str], pooling: str,
        palette: Palette | None = None, tile: int | None = None, tick: Callable[[], None] | None = None,
        kind=GRAM,
    ) -> dict:
        """The style loss `kind`'s targets (Gram matrices by default) of one style image resized so
        its long edge is `long_edge` (its colours adjusted by `palette` when the run keeps the
        content's), over tiles of `tile` px when set (the same numbers, in a tile's memory)."""
        x = images.to_tensor(images.resize_long_edge(style, long_edge)).to(self.device.place)
        if palette is not None:
            x = palette.style(x)
        extractor = self.network.extractor(layers, pooling)
        if tile:
            return Tiler(extractor, tile, autocast=self.autocast, tick=tick).stats(x, list(layers), kind)
        with self.autocast():
            feats = extractor(x, tick=tick)
        return {k: kind.style_stat(k, v) for k, v in feats.items()}

    def style_targets(self, styles: Sequence[StyleImage], content_size: tuple[int, int], p: StyleParams,
                      cache: TargetCache | None = None, palette: Palette | None = None,
                      size: int | None = None, tile: int | None = None,
                      tick: Callable[[], None] | None = None, kind=GRAM) -> list[dict]:
        """Each style's targets of the loss `kind` at the size rule's edge for a result of long
        edge `size` (default `p.size`), from `cache` where it has them."""
        edge = style_edge(content_size, size or p.size, p.style_scale)
        out = []
        for s in styles:
            compute = lambda img=s.image: self.style_grams(img, edge, p.style_layers, p.pooling, palette, tile, tick,  # noqa: E731
                                                           kind)
            if cache is None or s.digest is None:
                out.append(compute())
            else:
                key = cache.key(s.digest, edge, p.style_layers, p.pooling, str(self.device))
                out.append(cache.get(key + (palette.key() if palette else ()) + kind.key(), compute))
        return out

    def fit(self, content_size: tuple[int, int], p: StyleParams, budget_bytes: int, smallest: int = 64,
            regions: int = 0) -> int:
        """The result's long edge this engine can make inside `budget_bytes`: the size asked
        wherever some memory techniques make it fit (each stage then picks its own), smaller only
        where none does, never under `smallest` (nothing fits even there: the smallest, and the
        caller's out-of-memory handling). `regions`: the run's masked regions (regions.count)."""
        w, h = images.fit_long_edge(content_size, p.size)
        asked, budget_bytes = budget_bytes, self._pass_budget(budget_bytes, p, _frame_size((w, h), p.frame_max_size))
        layers = list(dict.fromkeys((*p.content_layers, *p.style_layers)))
        kw = dict(layers=layers, optimizer=p.optimizer, history=self.lbfgs_history, precision=self.precision,
                  pooling=p.pooling, device=self.device.type, content_layers=p.content_layers,
                  anchor=anchor_hw(content_size, p), style_loss=p.style_loss, regions=regions, jitter=p.jitter)
        fit = fit_size(h, w, budget_bytes, min_long_edge=min(smallest, p.size), tiles=p.style_loss != "sliced", **kw)
        if p.style_loss == "sliced" and (fit is None or max(fit) < max(w, h)):  # no tiles: refused, not shrunk
            raise refuse_tiles((w, h), _mib(asked), _mib(predict_peak_bytes(h, w, **kw)),
                               choose(h, w, budget_bytes, **{**kw, "style_loss": "w2"}) is not None)
        return max(fit) if fit else min(smallest, p.size)

    def _pass_budget(self, budget_bytes: int | None, p: StyleParams, frame_size: tuple[int, int]) -> int | None:
        """What the passes may use of `budget_bytes`: on the CPU the GIF's frames (at most
        FRAME_BYTES_MAX) live in the same memory, so they come off first."""
        if budget_bytes is None or not p.frame_every or self.device.place.type != "cpu":
            return budget_bytes
        fw, fh = frame_size
        return max(1, budget_bytes - min(FRAME_BYTES_MAX, frames_max(frame_size) * fw * fh * 3))

    def target_tile(self, styles: Sequence[StyleImage], edge: int, p: StyleParams,
                    budget_bytes: int | None) -> int | None:
        """The tile the largest style's target pass at long edge `edge` needs (memory.target_tile)."""
        if budget_bytes is None or not styles:
            return None
        w, h = max((images.fit_long_edge(s.image.size, edge) for s in styles), key=lambda s: s[0] * s[1])
        return target_tile(h, w, budget_bytes, p.style_layers, precision=self.precision, pooling=p.pooling,
                           device=self.device.type, style_loss=p.style_loss)

    def techniques(self, height: int, width: int, p: StyleParams, budget_bytes: int | None,
                   regions: int = 0) -> tuple[Techniques, str]:
        """The cheapest memory techniques for one stage inside `budget_bytes` (memory.choose), and
        why, in words for report.json. None fits: the most frugal, and the allocator's cap decides.
        `regions`: the run's masked regions (regions.count)."""
        layers = list(dict.fromkeys((*p.content_layers, *p.style_layers)))
        kw = dict(layers=layers, optimizer=p.optimizer, precision=self.precision, pooling=p.pooling,
                  device=self.device.type, content_layers=p.content_layers,
                  anchor=anchor_hw((width, height), p, max(width, height)), style_loss=p.style_loss,
                  regions=regions, jitter=p.jitter)
        plain = predict_peak_bytes(height, width, history=self.lbfgs_history, **kw)
        if budget_bytes is None:
            return Techniques(self.lbfgs_history), "no memory budget"
        mib, sliced = _mib, p.style_loss == "sliced"
        chosen = choose(height, width, budget_bytes, history=self.lbfgs_history, tiles=not sliced, **kw)
        if chosen is None and sliced:
            raise refuse_tiles((width, height), mib(budget_bytes), mib(plain),
                               choose(height, width, budget_bytes, history=self.lbfgs_history,
                                      **{**kw, "style_loss": "w2"}) is not None)
        if chosen is None:
            chosen = Techniques(min(5, self.lbfgs_history), True, 128)
            return chosen, f"nothing is predicted to fit {mib(budget_bytes)} (the plain pass needs {mib(plain)}); the most frugal"
        if chosen == Techniques(self.lbfgs_history):
            return chosen, f"the plain pass fits: {mib(plain)} of {mib(budget_bytes)}"
        need = predict_peak_bytes(height, width, history=chosen.history, checkpoint=chosen.checkpoint, tile=chosen.tile, **kw)
        return chosen, (f"the plain pass needs {mib(plain)}, over the budget of {mib(budget_bytes)}; the cheapest "
                        f"combination that fits needs {mib(need)}")

    def stylize(
        self,
        content: Image.Image,
        styles: Sequence[StyleImage | tuple[Image.Image, float]],
        params: StyleParams = StyleParams(),
        init_image: Image.Image | None = None,
        progress: Progress | Callable[[StepInfo], None] | None = None,
        cache: TargetCache | None = None,
        resume: Checkpoint | None = None,
        budget_bytes: int | None = None,
        techniques: Techniques | None = None,
        keep: Image.Image | None = None,
    ) -> Result:
        """Stylize `content` with the weighted blend of `styles` ((image, weight) pairs or StyleImages).

        The run goes through the stages `plan()` keeps of `params.schedule()` (coarse to fine),
        each started from the one before, upsampled. `cache` keeps style targets across runs (for styles with a
        digest). `progress` is told every step (a plain function is taken as `on_step`), gets
        checkpoints, and may stop the run with `Interrupted`; steps are counted across stages.
        `resume` continues from a checkpoint, in the stage it was taken in. `budget_bytes` is the
        peak memory each stage must fit: each picks the cheapest memory techniques that do;
        `techniques` forces the same ones on every stage instead (tests and benchmarks). A style's
        `mask` puts it where the mask is white (regions.py); `keep` is a mask of what stays the
        content.
        """
        styles = [s if isinstance(s, StyleImage) else StyleImage(*s) for s in styles]
        if progress is None:
            progress = Progress()
        elif not hasattr(progress, "on_step"):  # a plain function; any object shaped like Progress will do
            progress = OnStep(progress)
        t0 = time.perf_counter()
        p = params
        for name in (*p.content_layers, *p.style_layers):
            layer_index(name)
        if not styles:
            raise ValueError("at least one style image is needed")
        if p.optimizer not in ("lbfgs", "adam"):
            raise ValueError(f"unknown optimizer {p.optimizer!r} (expected lbfgs or adam)")
        style_kind(p.style_loss, tiled=bool(techniques and techniques.tile))  # an unknown one, or sliced forced tiled
        torch.manual_seed(p.seed)
        stages = self.plan(content, styles, p)
        frame_size = _frame_size(images.fit_long_edge(content.size, stages[-1].size), p.frame_max_size)
        run = Run(p=p, stages=stages, total=schedule.total_steps(stages), progress=progress, frame_size=frame_size,
                  start=resume.step if resume is not None else 0, t0=t0, content=content, styles=styles,
                  init_image=init_image, cache=cache, budget_bytes=self._pass_budget(budget_bytes, p, frame_size),
                  forced=techniques, keep=keep)
        run.tap = LossTap() if self.device.place.type == "cuda" else None  # one ring for every stage
        run.frames = Frames(lambda t: frame_of(t, run.frame_size, None, shown=True),
                            list(resume.frames) if resume is not None else [],
                            asynchronous=self.async_frames and self.device.place.type == "cuda", size=run.frame_size,
                            stride=resume.frame_stride if resume is not None else 1)
        run.sizes = [w * h for w, h in (images.fit_long_edge(content.size, st.size) for st in stages)]
        first, _ = schedule.stage_at(stages, run.start + 1)
        x = resume.image if resume is not None else None
        for index in range(first, len(stages)):
            x = StageLoop(self, run, index).execute(x)
        return run.result(self.device, self.precision, x)

    def plan(self, content: Image.Image, styles: Sequence[StyleImage], p: StyleParams) -> list[Stage]:
        """`p`'s stages, less the early ones too thin for the network: the content's or a style's
        short edge at that stage under what the deepest layer's pooling needs (a panorama, a
        small style_scale). A run whose last stage, a style or the anchor would still be too
        small is refused here with the reason (ValueError), as `nstd validate` refuses its job."""
        return p.plan(content.size, [s.image.size for s in styles])


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB" if n >= 100 * 2**20 else f"{n / 2**20:.1f} MiB"
