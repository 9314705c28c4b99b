"""One stage of a run: its targets, its start picture, its steps (eager, or replayed from a CUDA
graph) with progress, checkpoints and stops, and the closing check of its last picture."""
from __future__ import annotations

import time
from typing import Callable, ContextManager, Protocol, Sequence

import torch
from PIL import Image

from nstd.engine import graph, images, jitter, regions
from nstd.engine.adam import Adam
from nstd.engine.anchor import Anchor, anchor_hw
from nstd.engine.color import Palette
from nstd.engine.device import Device
from nstd.engine.graph import StepGraphs
from nstd.engine.guard import Guard
from nstd.engine.lbfgs import LBFGS
from nstd.engine.losses import Losses, Objective, blend
from nstd.engine.memory import Techniques
from nstd.engine.params import E512_PIXELS, FORWARD_SHARE, StyleParams
from nstd.engine.progress import Checkpoint, Interrupted, Progress, StepInfo
from nstd.engine.readbehind import frame_of
from nstd.engine.run import Run
from nstd.engine.schedule import style_edge
from nstd.engine.start import start_picture
from nstd.engine.styleloss import style_kind
from nstd.engine.targets import StyleImage, TargetCache
from nstd.engine.tiles import Tiler
from nstd.engine.vgg import Network


class Host(Protocol):
    """What a stage takes from the engine that runs it (nstd/engine/stylize.py, `Engine`)."""

    device: Device
    network: Network
    graphs: StepGraphs

    def autocast(self, capturing: bool = False) -> ContextManager: ...

    def techniques(self, height: int, width: int, p: StyleParams, budget_bytes: int | None) -> tuple[Techniques, str]: ...

    def target_tile(self, styles: Sequence[StyleImage], edge: int, p: StyleParams, budget_bytes: int | None) -> int | None: ...

    def style_targets(self, styles: Sequence[StyleImage], content_size: tuple[int, int], p: StyleParams,
                      cache: TargetCache | None = None, palette: Palette | None = None, size: int | None = None,
                      tile: int | None = None, tick: Callable[[], None] | None = None,
                      kind=None) -> list[dict]: ...


class StopNow(Exception):
    """A stop asked for within a long step (tiles.Tiler's tick): the run ends at the step before."""


class Gate:
    """Where a stop asked for is taken within a long pass: open in a stage's target passes and
    within its steps (the picture is then the last step's), shut between steps and in the
    stage's closing pass."""

    def __init__(self, progress: Progress):
        self.progress, self.open = progress, True

    def tick(self) -> None:
        """Within long passes: a heartbeat, and a stop asked for is taken now, not minutes later."""
        self.progress.alive()
        if self.open and self.progress.should_stop():
            raise StopNow


class StageLoop:
    """Stage `index` of `run`, from its targets to its picture: `execute` is the whole of it.

    Nothing here holds a reference back to the loop itself, so its tensors (targets, the L-BFGS
    history, the guard's best picture) go as soon as `execute` returns, before the next stage."""

    def __init__(self, engine: Host, run: Run, index: int):
        self.engine, self.run, self.index = engine, run, index
        self.p, self.stage, self.place = run.p, run.stages[index], engine.device.place
        self.begin = sum(s.steps for s in run.stages[:index])  # global steps before this stage
        self.end = self.begin + self.stage.steps
        self.first_step = max(self.begin, run.start) + 1
        self.gate = Gate(run.progress)

    def execute(self, previous: torch.Tensor | None) -> torch.Tensor:
        """The stage's picture (a detached device tensor), started from `previous` (the stage
        before's, or a checkpoint's; None: the run's start)."""
        self.t_stage = time.perf_counter()
        self.engine.device.reset_peak()
        content_img = images.resize_long_edge(self.run.content, self.stage.size)
        self.w, self.h = content_img.size
        self.tech: Techniques
        self.tech, self.why = ((self.run.forced, "forced by the caller") if self.run.forced else self.engine.techniques(
            self.h, self.w, self.p, self.run.budget_bytes, regions.count(self.run.styles, self.run.keep)))
        held = [previous]  # let go of once the stage's start picture is made
        del previous
        try:
            self.set_up(content_img, held)
        except StopNow:  # asked within a target pass: the stage has not begun; resume at its start
            before = held[0] if held else None
            image = before.detach().float().cpu().clone() if before is not None else None
            frames = self.run.frames
            raise Interrupted(Checkpoint(max(self.begin, self.run.start), image, frames.all(), frames.stride)) from None
        self.set_up_optimiser()
        self.loop()
        return self.finish()

    # ------------------------------------------------------------------ set-up

    def set_up(self, content_img: Image.Image, held: list) -> None:
        """Targets, the objective, the anchor and the start picture; `held` holds the picture
        the stage starts from, emptied once the start picture is made."""
        p, engine = self.p, self.engine
        lay = self.layout = regions.layout(self.run.styles, self.run.keep, self.run.content.size, (self.w, self.h), self.place)
        self.palette = Palette(p.preserve_color, images.to_tensor(content_img).to(self.place), lay.keep, lay.held)
        content_t = self.palette.content()
        layers = tuple(dict.fromkeys((*p.content_layers, *p.style_layers)))
        self.extractor = engine.network.extractor(layers, p.pooling)
        self.kind = style_kind(p.style_loss, p.seed, self.index, tiled=bool(self.tech.tile))
        self.tiler = (Tiler(self.extractor, self.tech.tile, self.tech.checkpoint, engine.autocast, self.gate.tick)
                      if self.tech.tile else None)
        self.jitter = jitter.for_stage(p, (self.h, self.w), self.place, self.tiler is not None)
        self.objective = self.jitter.regions(self.build_objective(content_t))
        self.anchor = self.build_anchor()
        self.x = start_picture(p, self.index, held[0], content_t, self.palette, self.run, self.place,
                               afresh=self.first_step == self.begin + 1)
        held.clear()
        self.gate.open = False  # from here on, between steps only

    def build_objective(self, content_t: torch.Tensor) -> Objective:
        """The stage's losses: content features of `content_t` and the styles' blended statistics.

        The style passes are sized by the result's long edge, not by the content's area (a thin
        content's stage is small, its style's pass need not be): each is read in tiles when the
        memory model says its whole pass would not fit the budget, or when seen larger than the
        picture (style_scale > 1)."""
        p, run, engine, stage = self.p, self.run, self.engine, self.stage
        edge = style_edge(run.content.size, stage.size, p.style_scale)
        style_tile = self.tech.tile or engine.target_tile(run.styles, edge, p, run.budget_bytes) or \
            (1024 if edge > stage.size else None)
        targets = engine.style_targets(run.styles, run.content.size, p, run.cache, self.palette, size=stage.size,
                                       tile=style_tile, tick=self.gate.tick, kind=self.kind)
        if self.tiler is not None:
            content_feats = self.tiler.features(content_t, p.content_layers)
        else:  # under each shift of the jitter (one, unshifted, without)
            with torch.no_grad(), engine.autocast():
                content_feats = self.jitter.content_targets(content_t, p.content_layers,
                                                            lambda t: self.extractor(t, tick=self.gate.tick))
        return Objective({k: content_feats[k] for k in p.content_layers}, {}, p.content_weight, p.style_weight,
                         p.tv_weight, self.kind, self.region_targets(targets, self.layout.regions))

    def region_targets(self, targets: list[dict], where: list) -> list[tuple[dict, object, float]]:
        """Each region's target: its styles' statistics blended (as without masks), its weights
        and share (regions.py)."""
        styles, layers = self.run.styles, self.p.style_layers
        out = []
        for r in where:
            mixed = blend([targets[i] for i in r.styles], [styles[i].weight for i in r.styles], self.kind)
            out.append(({k: mixed[k] for k in layers}, r.weights, r.share))
        return out

    def build_anchor(self) -> Anchor | None:
        """The style at the anchor size, for a stage larger than it (anchor.py); else None."""
        p, run, engine = self.p, self.run, self.engine
        hw = anchor_hw(run.content.size, p, self.stage.size)
        if not hw or not self.layout.regions:  # no region left to match (every mask black, all kept)
            return None
        tile = engine.target_tile(run.styles, style_edge(run.content.size, p.anchor_size, p.style_scale), p,
                                  run.budget_bytes)
        grams = engine.style_targets(run.styles, run.content.size, p, run.cache, self.palette, size=p.anchor_size,
                                     tick=self.gate.tick, tile=tile, kind=self.kind)
        return Anchor(hw, engine.network.extractor(p.style_layers, p.pooling),
                      Objective({}, {}, 0.0, p.style_weight, 0.0, self.kind,
                                self.region_targets(grams, self.layout.for_anchor(hw))), engine.autocast)

    def set_up_optimiser(self) -> None:
        """The first frame, the guard, the optimiser, and whether a step may be captured."""
        p, run, x = self.p, self.run, self.x
        self.history = self.tech.history if p.optimizer == "lbfgs" else 0
        if p.frame_every and not len(run.frames):
            run.frames.add(self.palette.show(x.detach()))
        self.guard = Guard(x)
        # A graph for the plain pass only: checkpointed and tiled steps are long (big pictures),
        # where a launch's cost is nothing, and the tiles' Python loop is better left eager.
        self.graph_kind = (p.preserve_color, self.anchor is not None)  # what a failed capture rules out
        graphs = self.engine.graphs
        self.use_graph = (graphs.possible() and p.optimizer == "lbfgs" and self.tiler is None
                          and not self.tech.checkpoint and self.graph_kind not in graphs.refused)
        self.captured: "torch.cuda.CUDAGraph | None" = None
        # The masked L-BFGS (no host read) wherever a step may be captured; on the CPU otherwise.
        self.opt: LBFGS | Adam | None = (LBFGS(x, history=self.tech.history, masked=x.is_cuda or self.use_graph)
                                         if p.optimizer == "lbfgs" else Adam(x))
        self.t_loop = time.perf_counter()
        self.e512_before = run.e512
        run.targets += self.t_loop - self.t_stage
        if run.t_opt is None:
            run.t_opt = self.t_loop
        anchor_px = self.anchor.size[0] * self.anchor.size[1] if self.anchor is not None else 0
        self.pass_cost = (self.w * self.h + anchor_px) / E512_PIXELS

    # ------------------------------------------------------------------ the step

    def evaluate(self, capturing: bool = False) -> None:
        """Loss and gradient at x; the guard sees them."""
        x, palette, objective, tiler = self.x, self.palette, self.objective, self.tiler
        x.grad = None
        seen = self.jitter.view(palette.view(x))
        if tiler is None:
            with self.engine.autocast(capturing):
                feats = self.extractor(seen, checkpoint=self.tech.checkpoint)
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
        if self.anchor is not None:  # after the main pass, whose activations are gone by now
            a = self.anchor(palette.view(x), capturing)
            a.backward()
            a = a.detach()
            losses = Losses(losses.content, losses.style + a, losses.tv, losses.total + a)
        self.guard.saw(losses, x)

    def lbfgs_step(self, capturing: bool = False) -> None:
        self.evaluate(capturing)
        self.opt.step(self.x.grad)
        # L-BFGS without a line search can overshoot wildly on a bad curvature estimate:
        # go back to the best picture so far and rebuild the history from there.
        self.opt.restart(self.guard.restore_if_diverged(self.x))

    def adam_step(self) -> None:
        self.evaluate()
        self.opt.step(self.x.grad)
        with torch.no_grad():
            self.x.clamp_(0, 1)

    def take_step(self, step: int) -> bool:
        """Global step `step`: eager, or captured once the warm-up is over (its check replays it
        once: that is this step), or replayed. True where a capture was tried: its warm-up
        evaluated the picture once more."""
        tried = captured_now = False
        self.jitter.at(step)  # before a replay too: the graph reads the shift in place
        self.kind.at(step)  # and the sliced kind its set of directions
        if self.use_graph and self.captured is None and step - self.first_step == graph.WARMUP_STEPS:
            self.use_graph, tried = False, True  # one try a stage
            self.captured = self.engine.graphs.capture(lambda: self.lbfgs_step(capturing=True), self.evaluate,
                                                       lambda: self.guard.evaluations, self.graph_kind)
            captured_now = self.captured is not None
        if captured_now:
            pass
        elif self.captured is not None:
            self.captured.replay()
        elif self.p.optimizer == "adam":
            self.adam_step()
        else:
            self.lbfgs_step()
        return tried

    # ------------------------------------------------------------------ the loop

    def checkpoint(self, at: int) -> Checkpoint:
        frames = self.run.frames
        return Checkpoint(at, self.x.detach().float().cpu().clone(), frames.all(), frames.stride)

    def loop(self) -> None:
        """The stage's steps, each told to progress; checkpoints and stops between them."""
        progress = self.run.progress
        for step in range(self.first_step, self.end + 1):
            self.gate.open = True
            try:
                tried = self.take_step(step)
            except StopNow:  # asked within a long (tiled) step: x is still the last step's picture
                raise Interrupted(self.checkpoint(step - 1)) from None
            finally:
                self.gate.open = False
            self.report(step, tried)
            if step < self.end:  # a stage's last picture is checked first (finish)
                if progress.checkpoint_due(step):
                    progress.on_checkpoint(self.checkpoint(step))
                if progress.should_stop():
                    raise Interrupted(self.checkpoint(step))

    def report(self, step: int, tried_capture: bool) -> None:
        """After step `step`: its frame, the pace and cost so far, and progress told."""
        p, run, x, palette = self.p, self.run, self.x, self.palette
        if p.frame_every and (step % p.frame_every == 0 or step == run.total) and \
                run.frames.wants(step // p.frame_every, last=step == run.total):
            run.frames.add(palette.show(x.detach()))
        elapsed = time.perf_counter() - run.t_opt
        run.work_done += self.w * self.h
        run.e512 += self.pass_cost * (2 if tried_capture else 1)
        tap = run.tap
        if tap is not None:
            tap.add(step, self.guard.last)
        run.progress.on_step(StepInfo(step, run.total, elapsed, self.guard.last,
                                      picture=lambda: frame_of(x, run.frame_size, palette), e512=run.e512,
                                      eta=elapsed / run.work_done * run.work_left(step),
                                      landed=tap.landed if tap is not None else None))

    def closing_losses(self, x: torch.Tensor) -> Losses:
        """The losses of picture `x` (the last update's, which no step evaluated), one forward pass."""
        palette, objective, tiler = self.palette, self.objective, self.tiler
        self.run.e512 += self.pass_cost * FORWARD_SHARE
        with torch.no_grad():
            if tiler is None:
                with self.engine.autocast():
                    seen = self.jitter.view(palette.view(x))
                    losses = objective(self.extractor(seen), seen)
            else:
                seen = palette.view(x)
                grams = tiler.region_stats(seen, objective.regions, objective.kind)
                feats = tiler.features(seen, list(objective.content))
                c = objective.content_term(feats, seen.new_zeros(()))
                s_, v = objective.style_term(grams, seen), objective.tv_term(seen)
                losses = Losses(c, s_, v, c + s_ + v)
                del grams, feats
            if self.anchor is not None:
                a = self.anchor(palette.view(x))
                losses = Losses(losses.content, losses.style + a, losses.tv, losses.total + a)
        return losses

    def finish(self) -> torch.Tensor:
        """The last update kept only if it is no worse than the best; the stage's record; between
        stages, a checkpoint or a stop at the picture the next one starts from."""
        run, x, guard = self.run, self.x, self.guard
        self.opt = None  # its history is not needed for the closing pass
        self.jitter.at(0)  # the last picture and, in doubt, the best judged under one shift (jitter.py)
        self.kind.at(0)  # and one set of directions
        final_losses = guard.settle(x, self.closing_losses(x), self.closing_losses if self.jitter.pad or self.kind.sets > 1 else None)
        x = self.x = self.palette.kept(x, self.palette.held)  # held pixels, never painted: the content's, passed on
        run.t_end = time.perf_counter()
        run.optimise += run.t_end - self.t_loop
        run.losses, run.palette, run.size, run.regions = final_losses, self.palette, (self.w, self.h), self.layout.report
        run.restarts += int(guard.restarts)
        run.cuda_graph = run.cuda_graph or self.captured is not None
        peak = self.engine.device.peak_bytes()
        run.peak = max(run.peak or 0, peak or 0) or None
        run.records.append({
            "size": [self.w, self.h], "steps": self.stage.steps, "steps_run": self.end - self.first_step + 1,
            "seconds": round(time.perf_counter() - self.t_stage, 3), "peak_memory_bytes": peak,
            "techniques": self.tech.names(), "lbfgs_history": self.history, "why": self.why,
            "anchor": [self.anchor.size[1], self.anchor.size[0]] if self.anchor is not None else None,
            "e512": round(run.e512 - self.e512_before, 2),
        })
        progress = run.progress
        if self.end < run.total:  # between stages: the picture the next one starts from
            if progress.checkpoint_due(self.end):
                progress.on_checkpoint(self.checkpoint(self.end))
            if progress.should_stop():
                raise Interrupted(self.checkpoint(self.end))
        return x.detach()
