"""The general exact engine (fallback for any model): one forward, seed-batched VJPs in chunks.

One forward in train mode gives the per-sample losses l [B] (BatchNorm with batch statistics; one
forward means one dropout mask, the same one the autograd loop would use after the same forward).
Then, for chunks of c seeds (sample indices i), one batched backward
    torch.autograd.grad(l, params, grad_outputs=E_chunk, is_grads_batched=True)
with E_chunk [c, B] the rows e_i of the identity gives g_i = dl_i/dtheta for the chunk, whose
per-parameter squared norms are formed at once; only c x P gradient entries are alive at a time.
If an op in the model has no batching rule for the seed-batched backward, the chunk is done one
seed at a time (the autograd loop) — the same numbers, slower.
"""
from __future__ import annotations

import warnings

import torch

from ._parallel import map_passes


def _batched_grads(losses, params, seed_rows, B):
    E = torch.zeros(len(seed_rows), B, dtype=losses.dtype, device=losses.device)
    E[torch.arange(len(seed_rows)), torch.as_tensor(seed_rows)] = 1
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(batching rule|performance drop|vmap).*")
        return torch.autograd.grad(losses, params, grad_outputs=E, is_grads_batched=True, retain_graph=True,
                                   allow_unused=True)


def seed_batched_sq_norms(losses: torch.Tensor, names, params, acc: torch.dtype, chunk: int,
                          batched: bool | None = None, workers: int | None = None) -> dict:
    """{name: [B] squared norms of dl_i/dp} for per-sample losses `losses` [B] (graph retained).

    `batched`: one is_grads_batched pass per chunk (default on GPUs) or one pass per seed (default on
    CPU, where it is ~3x faster than the batched pass; the passes run on worker threads, _parallel).
    `workers`: at most this many worker threads for the one-by-one passes (1: the plain autograd loop,
    each pass with all of torch's intra-op threads).
    """
    B = losses.shape[0]
    sq = {n: torch.zeros(B, dtype=acc, device=losses.device) for n in names}
    if batched is None:
        batched = losses.device.type != "cpu"
    batched_ok = batched and chunk > 1
    table = torch.zeros(B, len(names), dtype=acc, device=losses.device)   # rows of the one-by-one passes
    zero = table.new_zeros(())

    def one(i):
        # the seed as grad_outputs (no select node in the graph per pass)
        e = losses.new_zeros(B)
        e[i] = 1
        gs = torch.autograd.grad(losses, params, grad_outputs=e, retain_graph=True, allow_unused=True)
        # one row per seed (the same per-parameter sums; unused parameters stay 0)
        return torch.stack([zero if g is None else g.to(acc).square().sum() for g in gs])

    for start in range(0, B, chunk):
        rows = list(range(start, min(B, start + chunk)))
        grads = None
        if batched_ok:
            try:
                grads = _batched_grads(losses, params, rows, B)
            except (RuntimeError, NotImplementedError):   # no batching rule somewhere: loop instead
                batched_ok = False
        if grads is None:
            # one pass per seed for the whole rest of the batch, spread over worker threads on CPU
            rows = list(range(start, B))
            for i, row in zip(rows, map_passes(one, rows, losses.device, workers)):
                table[i] = row
            break
        for n, g in zip(names, grads):
            if g is not None:
                sq[n][rows] = g.to(acc).reshape(len(rows), -1).square().sum(1)
    for q, n in enumerate(names):
        sq[n] += table[:, q]
    return sq
