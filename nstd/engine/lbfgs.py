"""L-BFGS with torch.optim.LBFGS's algorithm, one iteration a step, and no host synchronisation.

torch's optimiser, run as we run it (one iteration per step, step length 1, no line search), reads
values back to the host inside every step: `float(loss)`, `ys > 1e-10`, the directional-derivative
test, each history entry's length. On a GPU each read waits for all queued work, so the device
idles while Python decides. Here every such decision is a mask on the device (`torch.where`):

- the history is two fixed (m, N) buffers used as a ring, with a count and a head kept as tensors;
  an update whose curvature `y.s` is not positive is masked out instead of skipped;
- the two-loop recursion always runs m rounds, the ones beyond the stored count masked to zero;
- the first step's length, `min(1, 1/|g|_1)`, and the restart after a diverging step (the guard:
  back to the best picture, history dropped) are masks too.

The arithmetic is torch's, in torch's order, so the iterates follow torch.optim.LBFGS (a test
checks it), and a step is a fixed sequence of kernels that updates its state in place: CUDA can
capture it in a graph and replay it (a graph replays into the very tensors it was captured with,
so no state may be a fresh tensor assigned to an attribute).
"""
from __future__ import annotations

import torch

#: torch's test for a usable curvature pair (`ys > 1e-10`).
CURVATURE_EPS = 1e-10


class LBFGS:
    """The optimiser's state for one picture `x` (any shape; float32)."""

    def __init__(self, x: torch.Tensor, history: int = 20, lr: float = 1.0, tolerance_change: float = -1.0,
                 masked: bool | None = None):
        """`masked`: every round of the recursion runs, masked, on gathered rows (no host read at
        all; the default on CUDA); else rows are views picked on the host (the CPU's default,
        where reading a tensor costs no wait). Both give the same numbers."""
        if history < 1:
            raise ValueError("history must be at least 1")
        self.x, self.m, self.lr = x, history, float(lr)
        self.masked = x.is_cuda if masked is None else masked
        self.tolerance_change = float(tolerance_change)
        n, dev = x.numel(), x.device
        f32 = dict(device=dev, dtype=torch.float32)
        self.dirs = torch.zeros(history, n, **f32)  # y: gradient differences
        self.stps = torch.zeros(history, n, **f32)  # s: steps taken
        self.ro = torch.zeros(history, **f32)  # 1 / (y . s)
        self.count = torch.zeros((), device=dev, dtype=torch.long)  # entries stored, <= m
        self.head = torch.zeros((), device=dev, dtype=torch.long)  # the slot the next entry takes
        self.h_diag = torch.ones((), **f32)
        self.d = torch.zeros(n, **f32)
        self.t = torch.zeros((), **f32)
        self.prev_grad = torch.zeros(n, **f32)
        self.first = torch.ones((), device=dev, dtype=torch.bool)  # the next step starts afresh
        self._al = torch.zeros(history, **f32)
        self._arange = torch.arange(history, device=dev)
        self._zero = torch.zeros((), **f32)

    def restart(self, where: torch.Tensor | bool = True) -> None:
        """Drop the history (where `where` holds): the next step is a first step again."""
        self.first.logical_or_(torch.as_tensor(where, device=self.first.device))

    @torch.no_grad()
    def step(self, grad: torch.Tensor) -> None:
        """One iteration from the gradient at `x` (the loss was just evaluated there): updates
        `x` in place."""
        g = grad.reshape(-1).float()
        first = self.first.clone()  # read before this step changes it
        m = self.m

        # The curvature pair of the last step, kept when y.s > eps (never on a first step). y and s
        # are made in place, in buffers rewritten below anyway: at 4096 px each picture-sized
        # temporary is 150 MB, and the memory model (memory.py) counts on few of them.
        y = self.prev_grad.neg_().add_(g)
        s = self.d.mul_(self.t)
        ys = y.dot(s)
        # (A pair that is not finite is left out too: torch would go NaN there anyway, and a stale
        # infinite row, even masked by a zero, would turn the masked recursion into NaN.)
        keep = ~first & (ys > CURVATURE_EPS) & torch.isfinite(ys)
        slot = self.head.view(1)
        self.dirs.index_copy_(0, slot, torch.where(keep, y, self.dirs.index_select(0, slot)[0]).unsqueeze(0))
        self.stps.index_copy_(0, slot, torch.where(keep, s, self.stps.index_select(0, slot)[0]).unsqueeze(0))
        self.ro.index_copy_(0, slot, torch.where(keep, 1.0 / ys, self.ro.index_select(0, slot)[0]).view(1))
        self.h_diag.copy_(torch.where(keep, ys / y.dot(y), self.h_diag))
        self.head.copy_(torch.where(keep, (self.head + 1) % m, self.head))
        self.count.copy_(torch.where(keep, torch.clamp(self.count + 1, max=m), self.count))
        # A first step starts with an empty history and H = 1.
        self.count.masked_fill_(first, 0)
        self.h_diag.masked_fill_(first, 1.0)
        del y, s

        # Two-loop recursion, newest entry first; rounds beyond the count contribute nothing.
        order = (self.head - 1 - self._arange) % m  # ring slots, newest first
        if self.masked:  # every round runs, masked; one row copied at a time (O(N) extra memory)
            dirs, stps, ro = (_Gathered(b, order) for b in (self.dirs, self.stps, self.ro))
            rounds = m
        else:  # on the CPU a tensor read costs no wait: row views, and only the stored rounds
            slots = order.tolist()
            dirs, stps, ro = (_Rows(b, slots) for b in (self.dirs, self.stps, self.ro))
            rounds = int(self.count)
        q = g.neg()
        for j in range(rounds):
            a = torch.where(self.count > j, stps[j].dot(q) * ro[j], self._zero)
            self._al[j] = a
            q.addcmul_(dirs[j], a, value=-1)
        r = q.mul_(self.h_diag)  # in place: q is not needed again
        for j in reversed(range(rounds)):  # oldest first
            be = dirs[j].dot(r) * ro[j]
            r.addcmul_(stps[j], torch.where(self.count > j, self._al[j] - be, self._zero))
        self.d.copy_(torch.where(first, g.neg(), r))
        del q, r
        d = self.d

        # Step length: 1 (lr), or min(1, 1/|g|_1) on a first step; no move when d is not a
        # descent direction by torch's test (g.d > -tolerance_change).
        t_first = torch.clamp(1.0 / torch.linalg.vector_norm(g, 1), max=1.0) * self.lr
        t = torch.where(first, t_first, torch.full_like(t_first, self.lr))
        move = g.dot(d) <= -self.tolerance_change
        self.x.addcmul_(d.view_as(self.x), torch.where(move, t, self._zero))

        self.t.copy_(t)
        self.prev_grad.copy_(g)
        self.first.fill_(False)


class _Rows:
    """Rows of a buffer in a given slot order, as views (no copies)."""

    def __init__(self, buf: torch.Tensor, slots: list[int]):
        self.buf, self.slots = buf, slots

    def __getitem__(self, j: int) -> torch.Tensor:
        return self.buf[self.slots[j]]


class _Gathered:
    """Rows of a buffer in a slot order given as a device tensor: each an index_select of one row."""

    def __init__(self, buf: torch.Tensor, order: torch.Tensor):
        self.buf, self.order = buf, order

    def __getitem__(self, j: int) -> torch.Tensor:
        return self.buf.index_select(0, self.order[j:j + 1])[0]
