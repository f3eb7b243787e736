"""Per-step influence of every sample of an actual training batch (the quantity the theory is about).

At a few sampled steps of training, on the step's own batch X (before the optimizer uses it), for
every sample i of the batch:

- infl_i = || grad L(X) - grad L(X without i) ||, L the mean cross-entropy, BatchNorm in train mode
  with its statistics recomputed on each reduced batch: `bnmem_kernels.loo_influence`;
- ||g_i||, g_i = d l_i(theta; X) / d theta the exact per-sample gradient (BN coupling included):
  `bnmem_kernels.per_sample_grad_norms(mode="exact")` (mode "eval" when no BN uses batch
  statistics: a frozen BN's actual gradient; `norm_mode`);
- ||g_i - gbar||, gbar = grad L(X) = mean_i g_i, from
  ||g_i - gbar||^2 = ||g_i||^2 - 2 <g_i, gbar> + ||gbar||^2. The kernels give ||g_i|| but no
  <g_i, gbar> for the exact gradients, so the inner products come here from one double backward on
  a float64 copy of the model: with weights u (all 1) on the per-sample losses,
  d/du_i < grad_theta (1/B) sum_j u_j l_j , gbar > = <g_i, gbar> / B (one extra forward, backward
  and backward-of-backward; no per-sample gradient is formed).

Without batch coupling (no BN, or BN with fixed statistics) infl_i = ||g_i - gbar|| / (B - 1)
exactly, so the coupling amplification infl_i / (||g_i - gbar|| / (B - 1)) is 1 up to rounding (a
check); with BN in train mode it measures what the coupling adds to sample i's pull on the step.

Nothing here changes the model: the kernels leave it as it was (their guarantee) and the inner
products are computed on a copy.
"""
from __future__ import annotations

import copy
import time

import numpy as np
import torch
import torch.nn.functional as F

import bnmem_kernels


def _ce(outputs, targets):
    return F.cross_entropy(outputs, targets, reduction="none")


def schedule(planned_steps: int, points: int) -> int:
    """Initial stride (in steps) between sampled steps: 1.5 x `points` samples over the planned steps,
    so a model stopped early by the matched-fit rule still has >= `points` once it ran 2/3 of its
    schedule. 0 points = off (returns 0). See Recorder for the thinning of longer runs."""
    if points <= 0:
        return 0
    return max(1, int(planned_steps / (1.5 * points)))


def centered_norms(model, x, y, exact_sq: torch.Tensor) -> tuple:
    """-> (||g_i - gbar|| [B] float64, ||gbar|| float) for the exact per-sample gradients g_i of the
    mean cross-entropy at the model's current state (train-mode statistics as the model is set).
    exact_sq: ||g_i||^2 [B] (from the kernels). Works on a float64 copy: the model is untouched."""
    m2 = copy.deepcopy(model).double()
    params = [p for p in m2.parameters() if p.requires_grad]
    B = x.shape[0]
    with torch.enable_grad():
        losses = _ce(m2(x.double()), y)
        u = torch.ones(B, dtype=torch.float64, requires_grad=True)
        grads = torch.autograd.grad((u * losses).sum() / B, params, create_graph=True)
        gbar = [g.detach() for g in grads]
        s = sum((g * gb).sum() for g, gb in zip(grads, gbar))
        dots = torch.autograd.grad(s, u)[0] * B          # <g_i, gbar>
    gbar_sq = float(sum((gb * gb).sum() for gb in gbar))
    c2 = exact_sq.double() - 2 * dots + gbar_sq
    return c2.clamp_min(0).sqrt(), gbar_sq ** 0.5


def norm_mode(model) -> str:
    """The per-sample gradient definition that IS the step's gradient: "exact" (BN statistics of the
    batch, coupling included) when a BatchNorm uses batch statistics, else "eval" (BN with fixed
    statistics, e.g. bn-frozen after its warm-up or bn-population; without BN all modes coincide).
    mode="exact" always uses batch statistics, which a frozen BN does not."""
    bn = torch.nn.modules.batchnorm._BatchNorm
    bns = [m for m in model.modules() if isinstance(m, bn)]
    return "eval" if bns and not any(m.training for m in bns) else "exact"


def measure(model, x, y) -> dict:
    """Influence, exact norms and centered norms of one batch (module docstring), with the time
    spent in bnmem_kernels and in the inner products. x, y on the model's device; B >= 2."""
    t0 = time.perf_counter()
    mode = norm_mode(model)
    infl = bnmem_kernels.loo_influence(model, _ce, x, y).detach().double().cpu()
    exact = bnmem_kernels.per_sample_grad_norms(model, _ce, x, y, mode=mode).detach().double().cpu()
    t1 = time.perf_counter()
    cen, gbar = centered_norms(model, x, y, exact.to(x.device) ** 2)
    t2 = time.perf_counter()
    return dict(infl=infl.numpy(), exact=exact.numpy(), mode=mode, centered=cen.detach().cpu().numpy(), gbar_norm=gbar,
                kernel_seconds=t1 - t0, extra_seconds=t2 - t1)


class Recorder:
    """Collects the sampled steps of one training run; `arrays()` -> the trace's infl_* arrays.
    Kernel and inner-product seconds count every measurement, also those thinned away later.
    Rows are padded to `batch_size` (index -1, NaN values) for a short last batch."""

    def __init__(self, planned_steps: int, points: int, batch_size: int):
        self.stride = schedule(planned_steps, points)
        self.points = points
        self.B = batch_size
        self.rows = []
        self.modes = set()
        self.kernel_seconds = self.extra_seconds = 0.0

    def due(self, step: int, batch_len: int) -> bool:
        return self.stride > 0 and batch_len >= 2 and step % self.stride == 0

    def _thin(self) -> None:
        """A run longer than planned (matched-fit extension): at 2 x points rows, double the stride and
        keep the rows on it, so the rows stay evenly spread over the whole run (points..2 x points)."""
        if len(self.rows) >= 2 * max(1, self.points):
            self.stride *= 2
            self.rows = [r for r in self.rows if r[0] % self.stride == 0]

    def record(self, step: int, epoch: int, idx, model, x, y) -> None:
        r = measure(model, x, y)
        self.kernel_seconds += r["kernel_seconds"]
        self.extra_seconds += r["extra_seconds"]
        self.rows.append((step, epoch, np.asarray(idx), r))
        self.modes.add(r["mode"])
        self._thin()

    def arrays(self) -> dict:
        P, B = len(self.rows), self.B
        idx = np.full((P, B), -1, np.int64)
        vals = {k: np.full((P, B), np.nan, np.float64) for k in ("infl", "exact", "centered")}
        for k, (_, _, ix, r) in enumerate(self.rows):
            idx[k, :len(ix)] = ix
            for key in vals:
                vals[key][k, :len(ix)] = r[key]
        return dict(infl_steps=np.array([s for s, *_ in self.rows], np.int64).reshape(P),
                    infl_epochs=np.array([e for _, e, *_ in self.rows], np.int64).reshape(P),
                    infl_idx=idx, infl=vals["infl"], infl_exact=vals["exact"], infl_centered=vals["centered"],
                    infl_gbar=np.array([r["gbar_norm"] for *_, r in self.rows], np.float64).reshape(P),
                    infl_norm_modes=np.array(sorted(self.modes), dtype="U16"),
                    infl_kernel_seconds=np.float64(self.kernel_seconds),
                    infl_extra_seconds=np.float64(self.extra_seconds))
