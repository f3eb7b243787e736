"""Independent backward passes spread over worker threads on CPU (the exact engines' seed passes).

On CPU one backward pass of a small network is a chain of small ops that a second intra-op thread
barely speeds up; the passes of the exact engines (one per seed or statistics row) are independent,
so `map_passes` runs them on W worker threads of one intra-op thread each instead, W = the
intra-op thread count (torch.get_num_threads()) or BNMEM_PASS_THREADS. Measured on 2 cores (bench
exact B64, 3-conv BN-CNN): the exact engine went from 0.98x to 1.23-1.43x the speed of the autograd
loop. While workers run, torch's intra-op thread count is 1 process-wide (it is global); the last
map_passes call to finish puts the count back, also on error. Concurrent `torch.autograd.grad`
calls on one retained graph are supported by PyTorch; each pass is computed as alone. GPUs and
W = 1: a plain loop.
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import torch


# fewer passes than this per worker run as a plain loop (handing them out costs more than it saves)
MIN_PASSES_PER_WORKER = 4
_POOLS: dict = {}
_POOLS_LOCK = threading.Lock()


_ACTIVE = {"calls": 0, "threads": None}     # map_passes calls running, torch's thread count before the first


def _pool(W: int) -> ThreadPoolExecutor:
    """One lazily created pool per worker count, kept for the process (starting threads costs ~3 ms a
    call; idle workers cost nothing). Concurrent map_passes calls share it: their tasks queue together."""
    with _POOLS_LOCK:
        if W not in _POOLS:
            _POOLS[W] = ThreadPoolExecutor(W, thread_name_prefix="bnmem-pass")
        return _POOLS[W]


def pass_workers(device) -> int:
    """Worker threads for independent backward passes on `device` (1 = a plain loop)."""
    if torch.device(device).type != "cpu":
        return 1
    env = os.environ.get("BNMEM_PASS_THREADS")
    if env:
        try:
            n = int(env)
        except ValueError:
            n = 0
        if n < 1:
            raise ValueError(f"BNMEM_PASS_THREADS must be an integer >= 1, got {env!r}")
        return n
    return max(1, torch.get_num_threads())


def map_passes(fn, items, device, workers=None) -> list:
    """[fn(item) for item in items], the calls spread over pass_workers(device) threads (items
    interleaved over the workers; at least MIN_PASSES_PER_WORKER each, else fewer workers or a plain
    loop) with one intra-op thread each; results in the order of items. fn must not call map_passes.
    `workers`: at most this many worker threads (1: a plain loop with torch's own intra-op threads)."""
    items = list(items)
    W = min(pass_workers(device), len(items) // MIN_PASSES_PER_WORKER)
    if workers is not None:
        W = min(W, workers)
    if W <= 1:
        return [fn(it) for it in items]
    with _POOLS_LOCK:     # the first of concurrent calls saves torch's thread count, the last restores it
        if _ACTIVE["calls"] == 0:
            _ACTIVE["threads"] = torch.get_num_threads()
            torch.set_num_threads(1)
        _ACTIVE["calls"] += 1
    try:
        parts = list(_pool(W).map(lambda w: [fn(it) for it in items[w::W]], range(W)))
    finally:
        with _POOLS_LOCK:
            _ACTIVE["calls"] -= 1
            if _ACTIVE["calls"] == 0:
                torch.set_num_threads(_ACTIVE["threads"])
    out: list = [None] * len(items)
    for w, part in enumerate(parts):
        out[w::W] = part
    return out
