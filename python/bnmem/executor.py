"""Local executor: a pool of worker processes (spawned, one torch thread each) over all cores.

One thread per process is both faster and steadier than intra-op threads on a small shared CPU:
measured here with other jobs running, a forward pass on 2 threads was 10x slower than on 1.
"""
from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import os


def _init_worker():
    import torch
    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)


def n_workers(requested: int, n_tasks: int) -> int:
    w = requested or os.cpu_count() or 1
    return max(1, min(w, n_tasks))


class Pool:
    """A lazily started process pool shared by the stages of one invocation (workers start once)."""

    def __init__(self, workers: int):
        self.workers = workers or os.cpu_count() or 1
        self._ex = None

    def executor(self):
        if self._ex is None:
            self._ex = cf.ProcessPoolExecutor(max_workers=self.workers, mp_context=mp.get_context("spawn"),
                                              initializer=_init_worker)
        return self._ex

    def close(self):
        if self._ex is not None:
            self._ex.shutdown(wait=True, cancel_futures=True)
            self._ex = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def parallel_map(fn, tasks, *, workers: int, desc: str, progress: bool, postfix=None, pool=None):
    """Run fn(*task) for each task; yields results as they finish (any order), with a tqdm bar.
    `pool`: a Pool to reuse (else one is started and closed here when workers > 1)."""
    from tqdm import tqdm

    tasks = list(tasks)
    bar = tqdm(total=len(tasks), desc=desc, unit="model", disable=not progress, dynamic_ncols=True)
    try:
        if workers <= 1:
            import torch
            torch.set_num_threads(1)
            for t in tasks:
                r = fn(*t)
                if postfix:
                    bar.set_postfix_str(postfix(r))
                bar.update(1)
                yield r
            return
        own = pool is None
        pool = pool or Pool(workers)
        try:
            ex = pool.executor()
            futs = [ex.submit(fn, *t) for t in tasks]
            try:
                for f in cf.as_completed(futs):
                    r = f.result()
                    if postfix:
                        bar.set_postfix_str(postfix(r))
                    bar.update(1)
                    yield r
            except BaseException:
                for f in futs:
                    f.cancel()
                raise
        finally:
            if own:
                pool.close()
    finally:
        bar.close()
