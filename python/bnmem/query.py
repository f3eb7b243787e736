"""Probe stage: logits of every candidate from every shadow model under small-shift augmentations.

BN models are queried both in eval mode (running statistics) and in train mode (batch statistics
of a shuffled batch of candidates and held-out test images, batch size as in training); both are
kept. The held-out test images (no model trained on them) are queried the same way: they are
RMIA's population.
Writes `logits/<variant>.npz`: eval [M, N, A, K], eval_pop [M, N_test, A, K] and, for BN
variants, train and train_pop.
"""
from __future__ import annotations

import copy
import os

import numpy as np
import torch
import torch.nn.functional as F

from .config import Config, from_dict
from .models import build_model, has_batchnorm
from .runfolder import load_state_dict, read_npz, write_npz
from .train import model_paths
from .cifar import apply_query_augmentation, query_augmentations  # noqa: E402 (cifar imports query lazily)


def shift_list(shifts: int) -> list:
    if shifts == 0:
        return [(0, 0)]
    return [(0, 0), (shifts, 0), (-shifts, 0), (0, shifts), (0, -shifts)]


def shift_images(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Translate [N, C, H, W] by (dy, dx) pixels, filling with the image's border-free zero (the mean)."""
    if dy == 0 and dx == 0:
        return x
    H, W = x.shape[-2:]
    p = max(abs(dy), abs(dx))
    xp = F.pad(x, (p, p, p, p))
    return xp[..., p - dy:p - dy + H, p - dx:p - dx + W]


@torch.no_grad()
def query_model(model, x: torch.Tensor, shifts, *, train_mode: bool, batch_size: int, seed: int) -> torch.Tensor:
    """-> logits [N, A, K]. train_mode: BN uses the statistics of each (shuffled, fixed) batch."""
    net = copy.deepcopy(model)
    net.train(train_mode)
    N = x.shape[0]
    order = torch.from_numpy(np.random.default_rng(seed).permutation(N)) if train_mode else torch.arange(N)
    outs = []
    for aug in shifts:  # (dy, dx) or (flip, dy, dx) (cifar.query_augmentations)
        xa = (shift_images(x, *aug) if len(aug) == 2 else apply_query_augmentation(x, aug))[order]
        bs = batch_size if train_mode else 1024
        chunks = [net(xa[i:i + bs]) for i in range(0, N, bs)]
        if train_mode and N % bs == 1 and len(chunks) > 1:  # a batch of one has no batch statistics
            last = net(xa[N - bs - 1:])  # recompute the tail as one batch of bs + 1
            chunks = chunks[:-2] + [last]
        z = torch.cat(chunks)
        res = torch.empty_like(z)
        res[order] = z
        outs.append(res)
    return torch.stack(outs, 1)


def query_one(root: str, cfg_dict: dict, variant: str, m: int) -> tuple:
    """Logits of model m of `variant`: (variant, m, eval [N, A, K], train [N, A, K] or None)."""
    torch.set_num_threads(1)
    cfg = from_dict(cfg_dict)
    d = read_npz(os.path.join(root, "data.npz"))
    n_cand = len(d["x"])
    x = torch.from_numpy(np.concatenate([d["x"], d["x_test"]]))  # candidates, then the population
    n_classes = int(max(d["y"].max(), d["y_test"].max()) + 1)
    shifts = query_augmentations(cfg.shifts) if cfg.query_flips else shift_list(cfg.shifts)
    model = build_model(cfg.arch, variant, x.shape[1:], n_classes, cfg.width)
    model.load_state_dict(load_state_dict(model_paths(root, variant, m)[0]))
    ev = query_model(model, x, shifts, train_mode=False, batch_size=cfg.batch_size, seed=0).numpy()
    tr = None
    if has_batchnorm(model):
        tr = query_model(model, x, shifts, train_mode=True, batch_size=cfg.batch_size,
                         seed=cfg.seed * 1000 + m).numpy()
    split = (lambda z: None if z is None else (z[:n_cand], z[n_cand:]))
    return variant, m, split(ev), split(tr)


def run_stage(root: str, cfg: Config, progress=True, log=print, pool=None) -> None:
    from .executor import n_workers, parallel_map

    os.makedirs(os.path.join(root, "logits"), exist_ok=True)
    todo = [v for v in cfg.variants if not os.path.exists(os.path.join(root, "logits", f"{v}.npz"))]
    if not todo:
        return
    tasks = [(root, {**cfg.hashed_dict(), "data_dir": cfg.data_dir}, v, m) for v in todo for m in range(cfg.models)]
    got = {v: {} for v in todo}
    for v, m, ev, tr in parallel_map(query_one, tasks, workers=n_workers(cfg.workers, len(tasks)),
                                     desc="probe", progress=progress, pool=pool):
        got[v][m] = (ev, tr)
        if len(got[v]) == cfg.models:
            arrays = dict(eval=np.stack([got[v][k][0][0] for k in range(cfg.models)]),
                          eval_pop=np.stack([got[v][k][0][1] for k in range(cfg.models)]),
                          shifts=np.array(query_augmentations(cfg.shifts) if cfg.query_flips else shift_list(cfg.shifts), np.int64))
            if got[v][0][1] is not None:
                arrays["train"] = np.stack([got[v][k][1][0] for k in range(cfg.models)])
                arrays["train_pop"] = np.stack([got[v][k][1][1] for k in range(cfg.models)])
            write_npz(os.path.join(root, "logits", f"{v}.npz"), **arrays)
            del got[v]
