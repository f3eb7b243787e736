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

# torch's intra-op thread count is process-wide, so the bookkeeping of who set it to 1 is too: the
# first running map_passes call (of any PassPool) saves the count, the last one to finish restores it.
_THREADS_LOCK = threading.Lock()
_ACTIVE = {"calls": 0, "threads": None}


class PassPool:
    """Worker threads for independent backward passes: one ThreadPoolExecutor per worker count,
    started on first use (starting threads costs ~3 ms a call; idle workers cost nothing) and kept
    until `shutdown()`. Concurrent `map` calls on one pool share its workers: their tasks queue
    together. The exact engines use `DEFAULT_POOL` through `map_passes`; `release_pass_threads()`
    stops its threads (the next call starts new ones)."""

    def __init__(self):
        self._executors: dict[int, ThreadPoolExecutor] = {}
        self._lock = threading.Lock()

    def executor(self, W: int) -> ThreadPoolExecutor:
        with self._lock:
            if W not in self._executors:
                self._executors[W] = ThreadPoolExecutor(W, thread_name_prefix="bnmem-pass")
            return self._executors[W]

    def shutdown(self) -> None:
        """Stop this pool's worker threads (after their running tasks)."""
        with self._lock:
            executors, self._executors = list(self._executors.values()), {}
        for ex in executors:
            ex.shutdown(wait=True)

    def map(self, fn, items, device, workers: int | None = None) -> list:
        """[fn(item) for item in items], the calls spread over pass_workers(device) threads (items
        interleaved over the workers; at least MIN_PASSES_PER_WORKER each, else fewer workers or a
        plain loop) with one intra-op thread each; results in the order of items. fn must not call
        map_passes. `workers`: at most this many worker threads."""
        items = list(items)
        W = min(pass_workers(device), len(items) // MIN_PASSES_PER_WORKER)
        if workers is not None:
            W = min(W, workers)
        if W <= 1:
            return [fn(it) for it in items]
        with _THREADS_LOCK:
            if _ACTIVE["calls"] == 0:
                _ACTIVE["threads"] = torch.get_num_threads()
                torch.set_num_threads(1)
            _ACTIVE["calls"] += 1
        try:
            parts = list(self.executor(W).map(lambda w: [fn(it) for it in items[w::W]], range(W)))
        finally:
            with _THREADS_LOCK:
                _ACTIVE["calls"] -= 1
                if _ACTIVE["calls"] == 0:
                    torch.set_num_threads(_ACTIVE["threads"])
        out: list = [None] * len(items)
        for w, part in enumerate(parts):
            out[w::W] = part
        return out


DEFAULT_POOL = PassPool()


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


def map_passes(fn, items, device, workers: int | None = None, pool: PassPool | None = None) -> list:
    """`pool.map(fn, items, device, workers)` on `pool` (default: DEFAULT_POOL, shared by the exact
    engines). `workers`: at most this many worker threads (1: a plain loop with torch's own intra-op
    threads)."""
    return (pool or DEFAULT_POOL).map(fn, items, device, workers)


def release_pass_threads() -> None:
    """Stop the exact engines' worker threads (DEFAULT_POOL); the next call starts new ones."""
    DEFAULT_POOL.shutdown()
