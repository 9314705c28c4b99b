"""The Gatys et al. optimisation: one image, optimised in RGB 0..1 against VGG-19 features.

`Engine` owns the network (loaded once) and runs jobs one after another. A "step" is one
forward+backward evaluation: L-BFGS runs one iteration per step (no line search), Adam one update.
"""
from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from PIL import Image

from nstd.engine import images
from nstd.engine.color import Palette
from nstd.engine.device import Device, pick_precision, resolve as resolve_device
from nstd.engine.options import DEFAULT_CONTENT_LAYERS, DEFAULT_STYLE_LAYERS
from nstd.engine.losses import Losses, Objective, blend_grams, gram
from nstd.engine.progress import Checkpoint, Interrupted, OnStep, Progress, StepInfo
from nstd.engine.targets import StyleImage, TargetCache, style_edge
from nstd.engine.vgg import Network, layer_index

ADAM_LR = 0.02  # in 0..1 pixel units


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


class _Guard:
    """Remembers the best evaluated picture and notices a diverging step (loss > 2 x best, or not finite)."""

    def __init__(self, x: torch.Tensor):
        self.best: Losses | None = None
        self.best_x = x.detach().clone()
        self.last: Losses | None = None
        self.diverged = False

    def saw(self, losses: Losses, x: torch.Tensor) -> None:
        self.last = losses
        total = losses.total
        if self.best is None or bool(total < self.best.total):
            self.best = losses
            self.best_x.copy_(x.detach())
            self.diverged = False
        else:
            self.diverged = not bool(torch.isfinite(total)) or bool(total > 2 * self.best.total)

    def restore(self, x: torch.Tensor) -> None:
        with torch.no_grad():
            x.copy_(self.best_x)
        self.diverged = False


class Engine:
    """A loaded network on one device, ready to run stylizations one at a time."""

    def __init__(
        self,
        weights: str = "vgg19-caffe",
        weights_file: Path | None = None,
        device: str | Device = "auto",
        precision: str = "auto",
        lbfgs_history: int = 20,
    ):
        self.device = resolve_device(device)
        self.precision = pick_precision(precision, self.device)
        self.weights = weights
        self.lbfgs_history = lbfgs_history
        self.device.allow_tf32()
        self.network = Network.load(weights, weights_file, self.device.place)
        # The first optimizer built in a process imports torch._dynamo (1.5 s here): pay it while
        # loading, not inside the first job's timings.
        torch.optim.LBFGS([torch.zeros(1, requires_grad=True)])

    def _autocast(self):
        if self.precision == "bf16":
            return torch.autocast(self.device.place.type, dtype=torch.bfloat16)
        return nullcontext()

    @torch.no_grad()
    def style_grams(
        self, style: Image.Image, long_edge: int, layers: Sequence[str], pooling: str,
        palette: Palette | None = None,
    ) -> dict[str, torch.Tensor]:
        """Gram targets of one style image resized so its long edge is `long_edge` (its colours
        adjusted by `palette` when the run keeps the content's)."""
        x = images.to_tensor(images.resize_long_edge(style, long_edge)).to(self.device.place)
        if palette is not None:
            x = palette.style(x)
        with self._autocast():
            feats = self.network.extractor(layers, pooling)(x)
        return {k: gram(v).detach() for k, v in feats.items()}

    def style_targets(self, styles: Sequence[StyleImage], content_size: tuple[int, int], p: StyleParams,
                      cache: TargetCache | None = None, palette: Palette | None = None) -> list[dict[str, torch.Tensor]]:
        """Each style's Gram targets at the size rule's edge, from `cache` where it has them."""
        edge = style_edge(content_size, p.size, p.style_scale)
        out = []
        for s in styles:
            compute = lambda img=s.image: self.style_grams(img, edge, p.style_layers, p.pooling, palette)  # noqa: E731
            if cache is None or s.digest is None:
                out.append(compute())
            else:
                key = cache.key(s.digest, edge, p.style_layers, p.pooling, str(self.device))
                out.append(cache.get(key + (palette.key() if palette else ()), compute))
        return out

    def stylize(
        self,
        content: Image.Image,
        styles: Sequence[StyleImage | tuple[Image.Image, float]],
        params: StyleParams = StyleParams(),
        init_image: Image.Image | None = None,
        progress: Progress | Callable[[StepInfo], None] | None = None,
        cache: TargetCache | None = None,
        resume: Checkpoint | None = None,
    ) -> Result:
        """Stylize `content` with the weighted blend of `styles` ((image, weight) pairs or StyleImages).

        `cache` keeps style targets across runs (for styles with a digest). `progress` is told
        every step (a plain function is taken as `on_step`), gets checkpoints, and may stop the
        run with `Interrupted`. `resume` continues from a checkpoint for the remaining steps.
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
        torch.manual_seed(p.seed)
        dev = self.device.place
        self.device.reset_peak()

        content_img = images.resize_long_edge(content, p.size)
        w, h = content_img.size
        palette = Palette(p.preserve_color, images.to_tensor(content_img).to(dev))
        content_t = palette.content()
        grams = self.style_targets(styles, content.size, p, cache, palette)
        target_grams = blend_grams(grams, [s.weight for s in styles])

        layers = tuple(dict.fromkeys((*p.content_layers, *p.style_layers)))
        extractor = self.network.extractor(layers, p.pooling)
        with torch.no_grad(), self._autocast():
            content_feats = extractor(content_t)
        objective = Objective(
            {k: content_feats[k] for k in p.content_layers},
            {k: target_grams[k] for k in p.style_layers},
            p.content_weight,
            p.style_weight,
            p.tv_weight,
        )
        del content_feats

        if resume is not None:
            x = resume.image.to(dev, torch.float32)
            if x.shape[-2:] != content_t.shape[-2:]:  # resumed at another working size (memory budget)
                x = torch.nn.functional.interpolate(x, size=content_t.shape[-2:], mode="bilinear", align_corners=False)
            x = x.contiguous().requires_grad_(True)
        else:
            x = palette.start(self._initial(p, content_t, init_image)).requires_grad_(True)
        if p.optimizer == "lbfgs":
            opt: torch.optim.Optimizer = torch.optim.LBFGS(
                [x], lr=1.0, max_iter=1, history_size=self.lbfgs_history, tolerance_grad=-1, tolerance_change=-1
            )
        elif p.optimizer == "adam":
            opt = torch.optim.Adam([x], lr=ADAM_LR)
        else:
            raise ValueError(f"unknown optimizer {p.optimizer!r} (expected lbfgs or adam)")

        frames: list[Image.Image] = list(resume.frames) if resume is not None else []
        if p.frame_every and not frames:
            frames.append(self._frame(x, p, palette))
        start = resume.step if resume is not None else 0
        guard = _Guard(x)

        def closure() -> torch.Tensor:
            opt.zero_grad(set_to_none=True)
            seen = palette.view(x)
            with self._autocast():
                feats = extractor(seen)
            losses = objective(feats, seen)
            losses.total.backward()
            guard.saw(Losses(*(t.detach() for t in (losses.content, losses.style, losses.tv, losses.total))), x)
            return losses.total

        t_opt = time.perf_counter()
        restarts = 0
        for step in range(start + 1, p.steps + 1):
            opt.step(closure)
            if p.optimizer == "adam":
                with torch.no_grad():
                    x.clamp_(0, 1)
            elif guard.diverged:
                # L-BFGS without a line search can overshoot wildly on a bad curvature estimate:
                # go back to the best picture so far and rebuild the history from there.
                guard.restore(x)
                opt.state.clear()
                restarts += 1
            if p.frame_every and (step % p.frame_every == 0 or step == p.steps):
                frames.append(self._frame(x, p, palette))
            progress.on_step(StepInfo(step, p.steps, time.perf_counter() - t_opt, guard.last,
                                      picture=lambda: self._frame(x, p, palette)))
            if step < p.steps:
                every = progress.checkpoint_every
                if every and step % every == 0:
                    progress.on_checkpoint(Checkpoint(step, x.detach().float().cpu().clone(), list(frames)))
                if progress.should_stop():
                    raise Interrupted(Checkpoint(step, x.detach().float().cpu().clone(), list(frames)))
        # The last update has not been evaluated: keep it only if it is no worse than the best.
        with torch.no_grad(), self._autocast():
            final_losses = objective(extractor(palette.view(x)), palette.view(x))
        if guard.best is not None and not float(final_losses.total) <= float(guard.best.total):
            guard.restore(x)
            final_losses = guard.best
        t_done = time.perf_counter()

        if frames:
            frames[-1] = self._frame(x, p, palette)
        result = Result(
            image=images.to_pil(palette.show(x.detach())),
            frames=frames,
            losses=final_losses.as_floats(),
            steps=p.steps,
            size=(w, h),
            device=str(self.device),
            device_name=self.device.name,
            precision=self.precision,
            timings={"targets": t_opt - t0, "optimise": t_done - t_opt},  # targets: style Grams + content features
            restarts=restarts,
            resumed_from=start,
        )
        result.peak_memory_bytes = self.device.peak_bytes()
        return result

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
    def _frame(x: torch.Tensor, p: StyleParams, palette: Palette) -> Image.Image:
        img = images.to_pil(palette.show(x.detach()))
        if max(img.size) > p.frame_max_size:
            img = images.resize_long_edge(img, p.frame_max_size)
        return img
