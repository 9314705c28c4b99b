"""The Gatys et al. optimisation: one image, optimised in RGB 0..1 against VGG-19 features.

`Engine` owns the network (loaded once) and runs jobs one after another. A "step" is one
forward+backward evaluation: L-BFGS runs one iteration per step (no line search), Adam one update.
"""
from __future__ import annotations

import time
import types
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import torch
from PIL import Image

from nstd.engine import images, schedule
from nstd.engine.color import Palette
from nstd.engine.device import Device, is_oom, pick_precision, resolve as resolve_device
from nstd.engine.options import DEFAULT_CONTENT_LAYERS, DEFAULT_STYLE_LAYERS
from nstd.engine.lbfgs import LBFGS
from nstd.engine.memory import Techniques, choose, fit_size, predict_peak_bytes, target_tile
from nstd.engine.schedule import Stage, StagesSetting
from nstd.engine.tiles import Tiler
from nstd.engine.losses import Losses, Objective, blend_grams, gram
from nstd.engine.progress import Checkpoint, Interrupted, OnStep, Progress, StepInfo
from nstd.engine.targets import StyleImage, TargetCache, style_edge
from nstd.engine.vgg import Network, layer_index

ADAM_LR = 0.02  # in 0..1 pixel units
#: E512, the cost that carries from one machine to any other: one forward+backward pass of the
#: picture over 512 x 512 pixels. A forward alone (a stage's closing check) counts a third.
E512_PIXELS = 512 * 512
FORWARD_SHARE = 1 / 3
#: Eager steps before a CUDA graph of the step is captured (lazy initialisation happens in them).
GRAPH_WARMUP_STEPS = 3


@dataclass(frozen=True)
class StyleParams:
    """What one stylization needs beyond its images. Defaults are the contract's."""

    size: int = 512
    steps: int = 300
    optimizer: str = "lbfgs"
    content_weight: float = 1.0
    style_weight: float = 1.0e4
    tv_weight: float = 0.0
    init: str = "content"  # content | noise | image (then pass init_image)
    pooling: str = "avg"
    content_layers: tuple[str, ...] = DEFAULT_CONTENT_LAYERS
    style_layers: tuple[str, ...] = DEFAULT_STYLE_LAYERS
    seed: int = 0
    style_scale: float = 1.0
    frame_every: int = 5  # 0: no frames
    frame_max_size: int = 512
    preserve_color: str = "none"  # none | luminance | histogram (see engine/color.py)
    bits: int = 8  # 16: the result is also kept as 16 bits per channel (Result.image16), for a tiff
    stages: StagesSetting = "auto"  # coarse-to-fine (see engine/schedule.py); 1: one scale
    stage_start: int = schedule.DEFAULT_START
    stage_factor: float = schedule.DEFAULT_FACTOR
    stage_steps: float = schedule.DEFAULT_STEP_RATIO
    #: a stage larger than this also matches the style at this long edge (0: off); see _Anchor
    anchor_size: int = 512
    #: rms of the fixed-seed grain added to each stage's start picture, in 8-bit levels (see _grain)
    grain: float = 8.0

    def schedule(self) -> list[Stage]:
        return schedule.plan(self.size, self.steps, self.stages, self.stage_start, self.stage_factor, self.stage_steps)

    def total_steps(self) -> int:
        return schedule.total_steps(self.schedule())

    def at_size(self, size: int) -> "StyleParams":
        """The same run with the result's long edge `size` (a memory budget's shrink): a list of
        stages is scaled with it."""
        stages = self.stages
        if not isinstance(stages, (str, int)):
            stages = tuple(Stage(max(32, round(st.size * size / self.size)), st.steps) for st in stages)
        return replace(self, size=size, stages=stages)


@dataclass
class Result:
    image: Image.Image
    frames: list[Image.Image]
    losses: dict[str, float]
    steps: int
    size: tuple[int, int]  # (width, height) actually used
    device: str
    precision: str
    device_name: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    peak_memory_bytes: int | None = None
    restarts: int = 0  # L-BFGS restarts after a diverging step
    resumed_from: int = 0  # the checkpoint's step, when the run resumed one
    cuda_graph: bool = False  # the steps after the warm-up were replayed from a captured CUDA graph
    #: the picture's passes through the network, each counted as its pixels over 512 x 512 (see E512)
    e512: float = 0.0
    #: one record a stage: size [w, h], steps, seconds, peak memory, the memory techniques and why
    stages: list[dict] = field(default_factory=list)
    #: (H, W, 3) uint16 numpy array of the result, when StyleParams.bits is 16 (else None)
    image16: object = None


class _Guard:
    """Remembers the best evaluated picture and notices a diverging step (loss > 2 x best, or not
    finite), all on the device: nothing here waits for the GPU."""

    def __init__(self, x: torch.Tensor):
        self.best_x = x.detach().clone()
        self.best_values = torch.full((4,), float("inf"), device=x.device)  # content, style, tv, total
        self.last: Losses | None = None
        self.diverged = torch.zeros((), dtype=torch.bool, device=x.device)
        self.restarts = torch.zeros((), dtype=torch.long, device=x.device)
        #: evaluations seen, counted on the device: a replayed graph must add one (Engine._capture)
        self.evaluations = torch.zeros((), dtype=torch.long, device=x.device)

    @property
    def best_total(self) -> torch.Tensor:
        return self.best_values[3]

    @property
    def best(self) -> Losses:
        return Losses(*self.best_values.unbind())

    def saw(self, losses: Losses, x: torch.Tensor) -> None:
        """In place throughout: a CUDA graph replays into the tensors it captured."""
        self.last = losses
        self.evaluations.add_(1)
        values = torch.stack([losses.content, losses.style, losses.tv, losses.total]).float()
        total, best = values[3], self.best_total
        improved = total < best
        self.diverged.copy_(~improved & (~torch.isfinite(total) | (total > 2 * best)))
        self.best_values.copy_(torch.where(improved, values, self.best_values))
        self.best_x.copy_(torch.where(improved, x.detach(), self.best_x))

    def restore_if_diverged(self, x: torch.Tensor) -> torch.Tensor:
        """Back to the best picture where the last evaluation diverged; returns the mask."""
        diverged = self.diverged.clone()
        with torch.no_grad():
            x.copy_(torch.where(diverged, self.best_x, x))
        self.restarts.add_(diverged.long())
        self.diverged.fill_(False)
        return diverged

    def restore(self, x: torch.Tensor) -> None:
        with torch.no_grad():
            x.copy_(self.best_x)


class _Frames:
    """The GIF's frames, read without stopping the GPU. On CUDA each frame is made 8-bit at the
    frame size on the device, copied into pinned host memory behind the steps queued so far, with
    an event on that device's stream, and made into a picture once that copy has landed (at a
    later frame, or when all are asked for): the GPU never waits for the host, and what waits in
    host memory is the frame, not the float picture. Elsewhere a frame is made at once. `convert`
    makes a picture of a tensor in display form; `size` is the frame size (width, height)."""

    def __init__(self, convert: Callable[[torch.Tensor], Image.Image], done: list[Image.Image], asynchronous: bool,
                 size: tuple[int, int] = (0, 0), stride: int = 1):
        self.convert, self.done, self.asynchronous, self.size = convert, done, asynchronous, size
        self.pending: list[tuple[torch.Tensor, "torch.cuda.Event"]] = []
        #: a frame is taken at every `stride`-th chance (doubled each time the frames are thinned)
        self.stride = stride
        self.limit = frames_max(size)

    def __len__(self) -> int:
        return len(self.done) + len(self.pending)

    def wants(self, chance: int, last: bool = False) -> bool:
        """Whether the `chance`-th frame (step // gif.every) is taken; the last step's always is."""
        return last or chance % self.stride == 0

    def add(self, shown: torch.Tensor) -> None:
        self._add(shown)
        if len(self) > self.limit:  # every other frame goes; from now on, half as many are taken
            self._collect(wait=True)
            self.done[:] = self.done[::2]
            self.stride *= 2

    def _add(self, shown: torch.Tensor) -> None:
        if not self.asynchronous:
            self.done.append(self.convert(shown))
            return
        w, h = self.size
        if shown.shape[-1] > w or shown.shape[-2] > h:  # a big picture: its frame is made smaller there
            shown = torch.nn.functional.interpolate(shown, size=(h, w), mode="bicubic", antialias=True,
                                                    align_corners=False)
        frame = images.to_uint8_hwc(shown)
        host = _pinned_like(frame)
        host.copy_(frame, non_blocking=True)  # stream-ordered: `frame`'s memory is not reused before
        landed = torch.cuda.Event()
        landed.record(torch.cuda.current_stream(frame.device))  # the copy's device, not the current one
        self.pending.append((host, landed))
        self._collect(wait=False)

    def _collect(self, wait: bool) -> None:
        while self.pending and (wait or self.pending[0][1].query()):
            host, landed = self.pending.pop(0)
            landed.synchronize()
            img = images.from_uint8_hwc(host)
            self.done.append(img if img.size == self.size else img.resize(self.size, Image.Resampling.LANCZOS))

    def all(self) -> list[Image.Image]:
        """Every frame so far, in order (waits for the copies still under way)."""
        self._collect(wait=True)
        return list(self.done)


class _LossTap:
    """Each step's losses copied to the host behind the GPU's queue (a ring of pinned buffers,
    each with an event), so progress can show a loss without stopping the GPU. A slot is read
    only while its newest copy has landed and none newer was queued into it."""

    SLOTS = 8

    def __init__(self) -> None:
        self.slots: list[list] = []  # [step, pinned (4,) float32, event]
        self.next = 0

    def add(self, step: int, losses: Losses) -> None:
        values = torch.stack([losses.content, losses.style, losses.tv, losses.total]).detach().float()
        if len(self.slots) < self.SLOTS:
            self.slots.append([step, _pinned_like(values), torch.cuda.Event()])
            slot = self.slots[-1]
        else:
            slot = self.slots[self.next]
            self.next = (self.next + 1) % self.SLOTS
            slot[0] = step
        slot[1].copy_(values, non_blocking=True)
        slot[2].record(torch.cuda.current_stream(values.device))

    def landed(self) -> tuple[int, dict[str, float]] | None:
        done = [s for s in self.slots if s[2].query()]
        if not done:
            return None
        step, host, _ = max(done, key=lambda s: s[0])
        return step, dict(zip(("content", "style", "tv", "total"), host.tolist()))


class _Adam:
    """torch.optim.Adam's update (betas 0.9/0.999, eps 1e-8), kept here so that no torch.optim
    optimiser is built: its first step imports torch._dynamo, over a second of start-up."""

    def __init__(self, x: torch.Tensor, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.x, self.lr, self.betas, self.eps = x, lr, betas, eps
        self.avg = torch.zeros_like(x)
        self.avg_sq = torch.zeros_like(x)
        self.n = 0

    @torch.no_grad()
    def step(self, grad: torch.Tensor) -> None:
        b1, b2 = self.betas
        self.n += 1
        self.avg.lerp_(grad, 1 - b1)
        self.avg_sq.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        denom = (self.avg_sq.sqrt() / (1 - b2 ** self.n) ** 0.5).add_(self.eps)
        self.x.addcdiv_(self.avg, denom, value=-self.lr / (1 - b1 ** self.n))


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
        #: on CUDA, capture an L-BFGS step in a graph and replay it (falls back to eager on failure)
        self.cuda_graphs = cuda_graphs
        #: kinds of step (preserve_color, anchor) whose capture failed: eager from then on
        self._graphs_refused: set[tuple] = set()
        self._capture_stream: "torch.cuda.Stream | None" = None
        #: on CUDA, GIF frames are copied behind the queued steps and converted later (see _Frames)
        self.async_frames = True
        self.device.allow_tf32()
        self.network = Network.load(weights, weights_file, self.device.place)

    def _autocast(self, capturing: bool = False):
        if self.precision == "bf16":
            # A graph must not capture autocast's cache of cast weights (torch's documented rule).
            return torch.autocast(self.device.place.type, dtype=torch.bfloat16, cache_enabled=not capturing)
        return nullcontext()

    @torch.no_grad()
    def style_grams(
        self, style: Image.Image, long_edge: int, layers: Sequence[str], pooling: str,
        palette: Palette | None = None, tile: int | None = None, tick: Callable[[], None] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Gram targets of one style image resized so its long edge is `long_edge` (its colours
        adjusted by `palette` when the run keeps the content's), over tiles of `tile` px when set
        (the same numbers, in a tile's memory)."""
        x = images.to_tensor(images.resize_long_edge(style, long_edge)).to(self.device.place)
        if palette is not None:
            x = palette.style(x)
        extractor = self.network.extractor(layers, pooling)
        if tile:
            return Tiler(extractor, tile, autocast=self._autocast, tick=tick).grams(x, list(layers))
        with self._autocast():
            feats = extractor(x, tick=tick)
        return {k: gram(v).detach() for k, v in feats.items()}

    def style_targets(self, styles: Sequence[StyleImage], content_size: tuple[int, int], p: StyleParams,
                      cache: TargetCache | None = None, palette: Palette | None = None,
                      size: int | None = None, tile: int | None = None,
                      tick: Callable[[], None] | None = None) -> list[dict[str, torch.Tensor]]:
        """Each style's Gram targets at the size rule's edge for a result of long edge `size`
        (default `p.size`), from `cache` where it has them."""
        edge = style_edge(content_size, size or p.size, p.style_scale)
        out = []
        for s in styles:
            compute = lambda img=s.image: self.style_grams(img, edge, p.style_layers, p.pooling, palette, tile, tick)  # noqa: E731
            if cache is None or s.digest is None:
                out.append(compute())
            else:
                key = cache.key(s.digest, edge, p.style_layers, p.pooling, str(self.device))
                out.append(cache.get(key + (palette.key() if palette else ()), compute))
        return out

    def fit(self, content_size: tuple[int, int], p: StyleParams, budget_bytes: int, smallest: int = 64) -> int:
        """The result's long edge this engine can make inside `budget_bytes`: the size asked
        wherever some memory techniques make it fit (each stage then picks its own), smaller only
        where none does, never under `smallest` (nothing fits even there: the smallest, and the
        caller's out-of-memory handling)."""
        w, h = images.fit_long_edge(content_size, p.size)
        budget_bytes = self._pass_budget(budget_bytes, p, _frame_size((w, h), p.frame_max_size))
        layers = list(dict.fromkeys((*p.content_layers, *p.style_layers)))
        fit = fit_size(h, w, budget_bytes, min_long_edge=min(smallest, p.size), layers=layers, optimizer=p.optimizer,
                       history=self.lbfgs_history, precision=self.precision, pooling=p.pooling,
                       device=self.device.type, content_layers=p.content_layers, anchor=_anchor_hw(content_size, p))
        return max(fit) if fit else min(smallest, p.size)

    def _pass_budget(self, budget_bytes: int | None, p: StyleParams, frame_size: tuple[int, int]) -> int | None:
        """What the passes may use of `budget_bytes`: on the CPU the GIF's frames (at most
        FRAME_BYTES_MAX) live in the same memory, so they come off first."""
        if budget_bytes is None or not p.frame_every or self.device.place.type != "cpu":
            return budget_bytes
        fw, fh = frame_size
        return max(1, budget_bytes - min(FRAME_BYTES_MAX, frames_max(frame_size) * fw * fh * 3))

    def _target_tile(self, styles: Sequence[StyleImage], edge: int, p: StyleParams,
                     budget_bytes: int | None) -> int | None:
        """The tile the largest style's target pass at long edge `edge` needs (memory.target_tile)."""
        if budget_bytes is None or not styles:
            return None
        w, h = max((images.fit_long_edge(s.image.size, edge) for s in styles), key=lambda s: s[0] * s[1])
        return target_tile(h, w, budget_bytes, p.style_layers, precision=self.precision, pooling=p.pooling,
                           device=self.device.type)

    def techniques(self, height: int, width: int, p: StyleParams, budget_bytes: int | None) -> tuple[Techniques, str]:
        """The cheapest memory techniques for one stage inside `budget_bytes` (memory.choose), and
        why, in words for report.json. None fits: the most frugal, and the allocator's cap decides."""
        layers = list(dict.fromkeys((*p.content_layers, *p.style_layers)))
        kw = dict(layers=layers, optimizer=p.optimizer, precision=self.precision, pooling=p.pooling,
                  device=self.device.type, content_layers=p.content_layers,
                  anchor=_anchor_hw((width, height), p, max(width, height)))
        plain = predict_peak_bytes(height, width, history=self.lbfgs_history, **kw)
        if budget_bytes is None:
            return Techniques(self.lbfgs_history), "no memory budget"
        mib = lambda n: f"{n / 2**20:.0f} MiB" if n >= 100 * 2**20 else f"{n / 2**20:.1f} MiB"  # noqa: E731
        chosen = choose(height, width, budget_bytes, history=self.lbfgs_history, **kw)
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
    ) -> Result:
        """Stylize `content` with the weighted blend of `styles` ((image, weight) pairs or StyleImages).

        The run goes through the stages of `params.schedule()` (coarse to fine), each started from
        the one before, upsampled. `cache` keeps style targets across runs (for styles with a
        digest). `progress` is told every step (a plain function is taken as `on_step`), gets
        checkpoints, and may stop the run with `Interrupted`; steps are counted across stages.
        `resume` continues from a checkpoint, in the stage it was taken in. `budget_bytes` is the
        peak memory each stage must fit: each picks the cheapest memory techniques that do;
        `techniques` forces the same ones on every stage instead (tests and benchmarks).
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
        torch.manual_seed(p.seed)
        stages = self.plan(content, styles, p)
        run = _Run(p=p, stages=stages, total=schedule.total_steps(stages), progress=progress,
                   frame_size=_frame_size(images.fit_long_edge(content.size, stages[-1].size), p.frame_max_size),
                   start=resume.step if resume is not None else 0, t0=t0)
        run.tap = _LossTap() if self.device.place.type == "cuda" else None  # one ring for every stage
        run.frames = _Frames(lambda t: self._frame(t, run.frame_size, None, shown=True),
                             list(resume.frames) if resume is not None else [],
                             asynchronous=self.async_frames and self.device.place.type == "cuda", size=run.frame_size,
                             stride=resume.frame_stride if resume is not None else 1)
        run.sizes = [w * h for w, h in (images.fit_long_edge(content.size, st.size) for st in stages)]
        first, _ = schedule.stage_at(stages, run.start + 1)
        x = resume.image if resume is not None else None
        budget_bytes = self._pass_budget(budget_bytes, p, run.frame_size)
        for index in range(first, len(stages)):
            x = self._run_stage(run, index, x, content, styles, init_image, cache, budget_bytes, techniques)
        return run.result(self, x)

    def plan(self, content: Image.Image, styles: Sequence[StyleImage], p: StyleParams) -> list[Stage]:
        """`p`'s stages, less the early ones too thin for the network: the content's or a style's
        short edge at that stage under what the deepest layer's pooling needs (a panorama, a
        small style_scale). A run whose last stage, a style or the anchor would still be too
        small is refused here with the reason (ValueError), as `nstd validate` refuses its job."""
        layers, stages = (*p.content_layers, *p.style_layers), p.schedule()
        sizes = [s.image.size for s in styles]
        why = schedule.too_small(content.size, sizes, stages, p.style_scale, p.anchor_size, layers, p.style_layers)
        if why:
            raise ValueError(why)
        return schedule.runnable(content.size, sizes, stages, p.style_scale, layers)

    def _run_stage(self, run: "_Run", index: int, previous: torch.Tensor | None, content: Image.Image,
                   styles: list[StyleImage], init_image: Image.Image | None, cache: TargetCache | None,
                   budget_bytes: int | None, forced: Techniques | None = None) -> torch.Tensor:
        """One stage: targets at its size, the picture from the stage before (or the start, or
        a checkpoint), its steps; returns the stage's picture (the optimised variable, on the host
        side of nothing: a detached device tensor)."""
        p, stage = run.p, run.stages[index]
        t_stage = time.perf_counter()
        self.device.reset_peak()
        content_img = images.resize_long_edge(content, stage.size)
        w, h = content_img.size
        tech, why = (forced, "forced by the caller") if forced else self.techniques(h, w, p, budget_bytes)
        # A stop is taken within a target pass or a step (then the picture is the last step's),
        # not in the stage's closing pass.
        gate = types.SimpleNamespace(open=True)

        def tick() -> None:
            """Within long passes: a heartbeat, and a stop asked for is taken now, not minutes later."""
            run.progress.alive()
            if gate.open and run.progress.should_stop():
                raise _StopNow

        begin = sum(s.steps for s in run.stages[:index])
        held = [previous]  # the body lets go of it once the stage's start picture is made
        del previous
        try:
            return self._stage_body(run, index, begin, held, content, content_img, styles, init_image, cache,
                                    tech, why, tick, gate, t_stage, budget_bytes)
        except _StopNow:  # asked within a target pass: the stage has not begun; resume at its start
            before = held[0] if held else None
            image = before.detach().float().cpu().clone() if before is not None else None
            raise Interrupted(Checkpoint(max(begin, run.start), image, run.frames.all(), run.frames.stride)) from None

    def _stage_body(self, run: "_Run", index: int, begin: int, held: list, content: Image.Image,
                    content_img: Image.Image, styles: list[StyleImage], init_image: Image.Image | None,
                    cache: TargetCache | None, tech: Techniques, why: str, tick: Callable[[], None], gate,
                    t_stage: float, budget_bytes: int | None) -> torch.Tensor:
        """The stage after its techniques are chosen: targets, start, steps, the closing pass.
        `held` holds the picture it starts from (the stage before's, or a checkpoint's)."""
        p, stage, dev = run.p, run.stages[index], self.device.place
        previous = held[0]
        w, h = content_img.size
        palette = Palette(p.preserve_color, images.to_tensor(content_img).to(dev))
        content_t = palette.content()
        layers = tuple(dict.fromkeys((*p.content_layers, *p.style_layers)))
        extractor = self.network.extractor(layers, p.pooling)
        tiler = Tiler(extractor, tech.tile, tech.checkpoint, self._autocast, tick) if tech.tile else None
        # The style passes are sized by the result's long edge, not by the content's area (a thin
        # content's stage is small, its style's pass need not be): each is read in tiles when the
        # memory model says its whole pass would not fit the budget, or when seen larger than
        # the picture (style_scale > 1).
        edge = style_edge(content.size, stage.size, p.style_scale)
        style_tile = tech.tile or self._target_tile(styles, edge, p, budget_bytes) or \
            (1024 if edge > stage.size else None)
        grams = self.style_targets(styles, content.size, p, cache, palette, size=stage.size, tile=style_tile, tick=tick)
        target_grams = blend_grams(grams, [s.weight for s in styles])
        del grams
        if tiler is not None:
            content_feats = tiler.features(content_t, p.content_layers)
        else:
            with torch.no_grad(), self._autocast():
                content_feats = extractor(content_t, tick=tick)
        objective = Objective(
            {k: content_feats[k] for k in p.content_layers},
            {k: target_grams[k] for k in p.style_layers},
            p.content_weight,
            p.style_weight,
            p.tv_weight,
        )
        del content_feats, target_grams
        anchor = None
        if _anchor_hw(content.size, p, stage.size):
            ah, aw = _anchor_hw(content.size, p, stage.size)
            grams = self.style_targets(styles, content.size, p, cache, palette, size=p.anchor_size, tick=tick,
                                       tile=self._target_tile(styles, style_edge(content.size, p.anchor_size,
                                                                                 p.style_scale), p, budget_bytes))
            anchor = _Anchor((ah, aw), self.network.extractor(p.style_layers, p.pooling),
                             Objective({}, blend_grams(grams, [s.weight for s in styles]), 0.0, p.style_weight, 0.0),
                             self._autocast)
            del grams

        first_step = max(begin, run.start) + 1
        if previous is not None:  # the stage before (upsampled), or a checkpoint (perhaps at another size)
            x = previous.to(dev, torch.float32)
            if x.shape[-2:] != content_t.shape[-2:]:
                x = torch.nn.functional.interpolate(x, size=content_t.shape[-2:], mode="bicubic", align_corners=False).clamp_(0, 1)
        else:
            x = palette.start(self._initial(p, content_t, init_image))
        if first_step == begin + 1 and p.grain > 0:  # the stage starts here (not mid-stage from a checkpoint)
            x = (x + _grain(x.shape, p.grain, p.seed, index).to(dev)).clamp_(0, 1)
        x = x.contiguous().requires_grad_(True)
        del previous
        held.clear()
        gate.open = False  # from here on, between steps only
        history = tech.history if p.optimizer == "lbfgs" else 0

        frames, progress = run.frames, run.progress
        if p.frame_every and not len(frames):
            frames.add(palette.show(x.detach()))
        guard = _Guard(x)

        def evaluate(capturing: bool = False) -> None:
            """Loss and gradient at x; the guard sees them."""
            x.grad = None
            seen = palette.view(x)
            if tiler is None:
                with self._autocast(capturing):
                    feats = extractor(seen, checkpoint=tech.checkpoint)
                losses = objective(feats, seen)
                losses.total.backward()
                losses = Losses(*(t.detach() for t in (losses.content, losses.style, losses.tv, losses.total)))
            else:
                c, s_, g = tiler.loss_and_grad(seen, objective)
                v = objective.tv_term(seen)
                if seen is x:
                    x.grad = g
                else:
                    seen.backward(g)
                del g
                if v.requires_grad:
                    v.backward()
                v = v.detach()
                losses = Losses(c, s_, v, c + s_ + v)
            if anchor is not None:  # after the main pass, whose activations are gone by now
                a = anchor(palette.view(x), capturing)
                a.backward()
                a = a.detach()
                losses = Losses(losses.content, losses.style + a, losses.tv, losses.total + a)
            guard.saw(losses, x)

        def lbfgs_step(capturing: bool = False) -> None:
            evaluate(capturing)
            opt.step(x.grad)
            # L-BFGS without a line search can overshoot wildly on a bad curvature estimate:
            # go back to the best picture so far and rebuild the history from there.
            opt.restart(guard.restore_if_diverged(x))

        # A graph for the plain pass only: checkpointed and tiled steps are long (big pictures),
        # where a launch's cost is nothing, and the tiles' Python loop is better left eager.
        graph_kind = (p.preserve_color, anchor is not None)  # what a failed capture rules out
        use_graph = (self._graphs_possible() and p.optimizer == "lbfgs" and tiler is None and not tech.checkpoint
                     and graph_kind not in self._graphs_refused)
        graph = None
        # The masked L-BFGS (no host read) wherever a step may be captured; on the CPU otherwise.
        opt: LBFGS | _Adam = (LBFGS(x, history=tech.history, masked=x.is_cuda or use_graph) if p.optimizer == "lbfgs"
                              else _Adam(x, lr=ADAM_LR))
        end = begin + stage.steps
        t_loop = time.perf_counter()
        e512_before = run.e512
        run.targets += t_loop - t_stage
        if run.t_opt is None:
            run.t_opt = t_loop
        tap = run.tap
        pass_cost = (w * h + (anchor.size[0] * anchor.size[1] if anchor is not None else 0)) / E512_PIXELS

        def checkpoint(at: int) -> Checkpoint:
            return Checkpoint(at, x.detach().float().cpu().clone(), frames.all(), frames.stride)

        for step in range(first_step, end + 1):
            gate.open = True
            try:
                captured_now = tried_capture = False
                if use_graph and graph is None and step - first_step == GRAPH_WARMUP_STEPS:
                    use_graph, tried_capture = False, True  # one try a stage; its warm-up evaluates once
                    graph = self._capture(lambda: lbfgs_step(capturing=True), evaluate, lambda: guard.evaluations,
                                          graph_kind)
                    captured_now = graph is not None  # its check replayed it once: that was this step
                if captured_now:
                    pass
                elif graph is not None:
                    graph.replay()
                elif p.optimizer == "adam":
                    evaluate()
                    opt.step(x.grad)
                    with torch.no_grad():
                        x.clamp_(0, 1)
                else:
                    lbfgs_step()
            except _StopNow:  # asked within a long (tiled) step: x is still the last step's picture
                raise Interrupted(checkpoint(step - 1)) from None
            finally:
                gate.open = False
            if p.frame_every and (step % p.frame_every == 0 or step == run.total) and \
                    frames.wants(step // p.frame_every, last=step == run.total):
                frames.add(palette.show(x.detach()))
            elapsed = time.perf_counter() - run.t_opt
            run.work_done += w * h
            run.e512 += pass_cost * (2 if tried_capture else 1)
            if tap is not None:
                tap.add(step, guard.last)
            progress.on_step(StepInfo(step, run.total, elapsed, guard.last,
                                      picture=lambda: self._frame(x, run.frame_size, palette),
                                      eta=elapsed / run.work_done * run.work_left(step),
                                      landed=tap.landed if tap is not None else None))
            if step < end:  # a stage's last picture is checked first (below)
                if progress.checkpoint_due(step):
                    progress.on_checkpoint(checkpoint(step))
                if progress.should_stop():
                    raise Interrupted(checkpoint(step))
        # The last update has not been evaluated: keep it only if it is no worse than the best.
        del opt
        with torch.no_grad():
            if tiler is None:
                with self._autocast():
                    final_losses = objective(extractor(palette.view(x)), palette.view(x))
            else:
                seen = palette.view(x)
                grams = tiler.grams(seen, list(objective.style))
                feats = tiler.features(seen, list(objective.content))
                c = objective.content_term(feats, seen.new_zeros(()))
                s_, v = objective.style_term(grams), objective.tv_term(seen)
                final_losses = Losses(c, s_, v, c + s_ + v)
                del grams, feats
            if anchor is not None:
                a = anchor(palette.view(x))
                final_losses = Losses(final_losses.content, final_losses.style + a, final_losses.tv, final_losses.total + a)
        run.e512 += pass_cost * FORWARD_SHARE
        if not float(final_losses.total) <= float(guard.best_total):
            guard.restore(x)
            final_losses = guard.best
        run.t_end = time.perf_counter()
        run.optimise += run.t_end - t_loop
        run.losses, run.palette, run.size = final_losses, palette, (w, h)
        run.restarts += int(guard.restarts)
        run.cuda_graph = run.cuda_graph or graph is not None
        peak = self.device.peak_bytes()
        run.peak = max(run.peak or 0, peak or 0) or None
        run.records.append({
            "size": [w, h], "steps": stage.steps, "steps_run": end - first_step + 1,
            "seconds": round(time.perf_counter() - t_stage, 3), "peak_memory_bytes": peak,
            "techniques": tech.names(), "lbfgs_history": history, "why": why,
            "anchor": [aw, ah] if anchor is not None else None,
            "e512": round(run.e512 - e512_before, 2),
        })
        if end < run.total:  # between stages: the picture the next one starts from
            if progress.checkpoint_due(end):
                progress.on_checkpoint(checkpoint(end))
            if progress.should_stop():
                raise Interrupted(checkpoint(end))
        return x.detach()

    def _graphs_possible(self) -> bool:
        return self.cuda_graphs and self.device.is_cuda and self.device.place.type == "cuda"

    def _side_stream(self) -> "torch.cuda.Stream":
        """The stream captures are taken on: one per engine (each new stream gets a cuBLAS
        workspace of its own, kept for the life of the process)."""
        if self._capture_stream is None:
            self._capture_stream = torch.cuda.Stream(device=self.device.torch)
        return self._capture_stream

    def _capture(self, step: Callable[[], None], warm: Callable[[], None], counter: Callable[[], torch.Tensor],
                 kind: tuple = ()) -> "torch.cuda.CUDAGraph | None":
        """A CUDA graph of one whole step (forward, backward, L-BFGS update, guard), to replay for
        the rest of the run: one launch instead of hundreds, and the CPU free. Then replayed once
        as this step and checked: `counter()` (the guard's count of evaluations, a device tensor
        the step adds one to in place) must have grown by one; a graph that captured nothing
        leaves it. None, with one log line, when any of that fails: the run goes on eagerly, never
        with a wrong result (the failed capture ran nothing; its warm-up evaluated the picture,
        which the eager step evaluates again). Out of memory: eager for this stage only. Any other
        failure: steps of this `kind` (colour mode, anchor) are not captured again by this engine,
        and none at all after a capture CUDA had to end under torch."""
        from loguru import logger

        try:
            graph = _record_graph(self.device.torch, step, warm, self._side_stream())
            before = int(counter())
            graph.replay()
            if int(counter()) != before + 1:
                raise RuntimeError("the captured step evaluated nothing (an empty graph)")
            return graph
        except Exception as exc:  # an op that cannot be captured, no memory for the pool, an empty graph
            cause = exc.cause if isinstance(exc, _CaptureFailed) else exc
            if isinstance(exc, _CaptureFailed) and not exc.clean:
                self.cuda_graphs = False
                then = "and every step from now on"
            elif is_oom(cause):
                then = "for this stage (no memory for the graph)"
            else:
                self._graphs_refused.add(kind)
                then = "and such steps from now on"
            logger.warning("the step cannot be captured in a CUDA graph ({}: {}); running it eagerly, {}",
                           type(cause).__name__, str(cause).splitlines()[0] if str(cause) else "", then)
            return None

    def _initial(self, p: StyleParams, content_t: torch.Tensor, init_image: Image.Image | None) -> torch.Tensor:
        if p.init == "content":
            return content_t.clone()
        if p.init == "noise":
            g = torch.Generator().manual_seed(p.seed)
            return torch.rand(content_t.shape, generator=g).to(self.device.place)
        if init_image is None:
            raise ValueError(f"init {p.init!r} needs an init image")
        _, _, h, w = content_t.shape
        return images.to_tensor(init_image.resize((w, h), Image.Resampling.LANCZOS)).to(self.device.place)

    @staticmethod
    def _frame(x: torch.Tensor, size: tuple[int, int], palette: Palette | None, shown: bool = False) -> Image.Image:
        """A GIF frame of the picture `x` (already in display form when `shown`) at `size`: every
        stage's frames at the final stage's frame size."""
        img = images.to_pil(x.detach() if shown else palette.show(x.detach()))
        if img.size != size:
            img = img.resize(size, Image.Resampling.LANCZOS)
        return img


def _pinned_like(t: torch.Tensor) -> torch.Tensor:
    """Page-locked host memory shaped like `t`: a copy into it can run behind the GPU's queue."""
    return torch.empty(t.shape, dtype=t.dtype, pin_memory=True)


class _CaptureFailed(RuntimeError):
    """The capture failed. `clean`: it ended properly (the step raised inside it, or ran out of
    memory), so the allocator is as before; otherwise CUDA ended it and torch's allocator was told
    only by the best-effort release in _record_graph."""

    def __init__(self, cause: BaseException, clean: bool):
        super().__init__(f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}")
        self.cause, self.clean = cause, clean


def _record_graph(dev: torch.device, step: Callable[[], None], warm: Callable[[], None],
                  side: "torch.cuda.Stream") -> "torch.cuda.CUDAGraph":
    """`step` captured in a CUDA graph on `dev`, on the stream `side`, in thread-local mode
    (another worker's GPU calls go on meanwhile), after `warm` ran on that stream (torch's rule:
    a warm-up on a side stream before capture). torch.cuda.graph's recipe (synchronise, empty the
    cache: a capture cannot use blocks cached outside its pool, and the allocator's cap counts
    them) with capture_begin/capture_end by hand, so that the stream is restored however the
    capture ends and a capture that CUDA ended under torch (an op not allowed while capturing)
    gives its memory pool back instead of leaving the allocator in capture mode for good.
    Raises _CaptureFailed."""
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
                    _release_pool(dev, pool)
                    raise _CaptureFailed(exc, clean=False) from exc
                raise _CaptureFailed(exc, clean=True) from exc
            try:
                graph.capture_end()
            except Exception as exc:
                _release_pool(dev, pool)
                raise _CaptureFailed(exc, clean=False) from exc
        main.wait_stream(side)
    return graph


def _release_pool(dev: torch.device, pool) -> None:
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


def _grain(shape: torch.Size, rms: float, seed: int, stage: int) -> torch.Tensor:
    """Fixed-seed Gaussian grain of `rms` 8-bit levels, the same for the same seed and stage.

    Why: in a flat region of a start picture (the content's sky, or any stage's upsampled picture)
    the fine scales hold no energy. With average pooling only conv1_1's Gram matrix pushes there
    (the pools average the rest away: docs/quality.md), and a Gram loss grows what it finds in
    proportion to what is there, so from almost nothing its fastest-growing frequencies win: a
    periodic grid. Grain in every direction and scale gives it strokes to shape instead."""
    g = torch.Generator().manual_seed(seed * 1009 + stage)
    return torch.randn(tuple(shape), generator=g, dtype=torch.float32).mul_(rms / 255.0)


def _anchor_hw(content_size: tuple[int, int], p: StyleParams, size: int | None = None) -> tuple[int, int] | None:
    """(h, w) of the anchor's pass for a stage of long edge `size` (default the result's)."""
    return schedule.anchor_hw(content_size, p.anchor_size, size or p.size)


class _Anchor:
    """The style term of the picture scaled down to the anchor size (antialiased), against the
    style seen at that size: added to a big stage's loss, it keeps the strokes the size they have
    at the anchor, relative to the picture, while the stage's own term adds the detail its pixels
    allow. Without it, the last stages of a 2048 px run repaint the strokes at their own scale
    (measured: the style loss at 512 px of the 2048 px result rose to 3.3x the 512 px run's)."""

    def __init__(self, size: tuple[int, int], extractor, objective: Objective, autocast):
        self.size, self.extractor, self.objective, self.autocast = size, extractor, objective, autocast

    def __call__(self, seen: torch.Tensor, capturing: bool = False) -> torch.Tensor:
        small = torch.nn.functional.interpolate(seen, size=self.size, mode="bilinear", antialias=True, align_corners=False)
        with self.autocast(capturing):
            feats = self.extractor(small)
        return self.objective.style_term({k: gram(feats[k]) for k in self.objective.style})


class _StopNow(Exception):
    """A stop asked for within a long step (tiles.Tiler's tick): the run ends at the step before."""


#: A GIF frame's long edge at most, whatever a job asks: frames are held until the end.
FRAME_EDGE_MAX = 1024
#: What a run's frames may take in memory (and in a checkpoint), and how many there may be: past
#: either, every other frame goes and frames are taken half as often (the GIF keeps its pace).
FRAME_BYTES_MAX = 128 * 2**20
FRAMES_MAX = 300
FRAMES_MIN = 16


def _frame_size(final: tuple[int, int], max_size: int) -> tuple[int, int]:
    """The GIF's frame size: the result's, scaled down to `max_size` (never up) and to FRAME_EDGE_MAX."""
    max_size = min(max_size, FRAME_EDGE_MAX)
    return images.fit_long_edge(final, max_size) if max(final) > max_size else final


def frames_max(size: tuple[int, int]) -> int:
    """How many frames of `size` a run holds at most (FRAME_BYTES_MAX, within FRAMES_MIN..FRAMES_MAX)."""
    return max(FRAMES_MIN, min(FRAMES_MAX, FRAME_BYTES_MAX // max(1, size[0] * size[1] * 3)))


@dataclass
class _Run:
    """What the stages of one run share, and what they leave for its Result."""

    p: StyleParams
    stages: list[Stage]
    total: int
    progress: Progress
    frame_size: tuple[int, int]
    start: int
    t0: float
    frames: "_Frames | None" = None
    tap: "_LossTap | None" = None  # on CUDA: the losses progress shows, read behind the GPU
    t_opt: float | None = None  # when the first step began
    t_end: float = 0.0  # when the last stage's steps ended
    targets: float = 0.0
    optimise: float = 0.0
    losses: Losses | None = None
    palette: Palette | None = None
    size: tuple[int, int] = (0, 0)
    restarts: int = 0
    cuda_graph: bool = False
    peak: int | None = None
    records: list[dict] = field(default_factory=list)
    work_done: float = 0.0  # pixel-steps run in this call (the ETA's pace)
    e512: float = 0.0  # passes of the picture run in this call, in E512
    sizes: list[int] = field(default_factory=list)  # each stage's pixels, for the ETA

    def work_left(self, step: int) -> float:
        """Pixel-steps after global step `step`."""
        left, before = 0.0, 0
        for st, px in zip(self.stages, self.sizes):
            left += px * max(0, min(st.steps, before + st.steps - step))
            before += st.steps
        return left

    def result(self, engine: Engine, x: torch.Tensor) -> Result:
        t_done = time.perf_counter()
        frames = self.frames.all()
        shown = self.palette.show(x)
        if frames:
            frames[-1] = engine._frame(shown, self.frame_size, None, shown=True)
        return Result(
            image=images.to_pil(shown),
            image16=images.to_uint16_hwc(shown) if self.p.bits == 16 else None,
            frames=frames,
            losses=self.losses.as_floats(),
            steps=self.total,
            size=self.size,
            device=str(engine.device),
            device_name=engine.device.name,
            precision=engine.precision,
            # targets: each stage's style Grams and content features; optimise: the steps
            timings={"targets": self.targets, "optimise": self.optimise},
            restarts=self.restarts,
            cuda_graph=self.cuda_graph,
            e512=round(self.e512, 2),
            resumed_from=self.start,
            peak_memory_bytes=self.peak,
            stages=self.records,
        )
