"""Local executor: a pool of worker processes (spawned, one torch thread each) over all cores.

One thread per process is both faster and steadier than intra-op threads on a small shared CPU:
measured here with other jobs running, a forward pass on 2 threads was 10x slower than on 1.

No orphans: a worker dies with the process that started it, also when that one is killed with
SIGKILL (no chance to shut the pool down). On Linux the worker asks the kernel for SIGKILL on its
parent's death (prctl PR_SET_PDEATHSIG); elsewhere, and as a second guard, a daemon thread checks
once a second that its parent pid is unchanged and exits the worker if not.
"""
from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import os
import signal
import sys
import threading
import time

PR_SET_PDEATHSIG = 1   # linux/prctl.h


def die_with_parent(parent_pid: int, poll_s: float = 1.0) -> None:
    """Make this process exit when `parent_pid` (the process that started it) dies: prctl
    PR_SET_PDEATHSIG (Linux) and a watchdog thread polling os.getppid(). If the parent is already
    gone (it died before this ran), exit now."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass   # the watchdog below still covers it
    if os.getppid() != parent_pid:
        os._exit(1)

    def watch():
        while True:
            time.sleep(poll_s)
            if os.getppid() != parent_pid:
                os._exit(1)

    threading.Thread(target=watch, name="bnmem-parent-watchdog", daemon=True).start()


_REAPER = r"""
import os, signal, sys, time
driver = int(sys.argv[1])
def table():
    out = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            out[int(d)] = (int(fields[1]), fields[19])   # parent pid, start time
    return out
known = {}
while os.getppid() == driver:
    t = table()
    kids, frontier = set(), {driver}
    while frontier:
        frontier = {p for p, (pp, _) in t.items() if pp in frontier and p not in kids and p != os.getpid()}
        kids |= frontier
    known.update({p: t[p][1] for p in kids})
    time.sleep(0.5)
t = table()
for p, start in known.items():
    if p in t and t[p][1] == start:
        try:
            os.kill(p, signal.SIGKILL)
        except OSError:
            pass
"""


def start_reaper():
    """Linux: a small process that, when this one dies (also by SIGKILL), kills every process that
    descended from it (remembered every 0.5 s, matched by start time) — for process trees whose
    members do not all die with their parent (a local Ray instance's agents). Returns its Popen, or
    None where /proc is not there. Stop it with .kill() when the tree is shut down normally."""
    if not os.path.isdir("/proc/self"):
        return None
    import subprocess
    return subprocess.Popen([sys.executable, "-c", _REAPER, str(os.getpid())], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _init_worker(parent_pid: int | None = None):
    if parent_pid is not None:
        die_with_parent(parent_pid)
    import torch
    torch.set_num_threads(THREADS_PER_PROCESS)
    torch.set_num_interop_threads(THREADS_PER_PROCESS)


THREADS_PER_PROCESS = 1   # torch intra-op and inter-op threads of every unit of work (worker or in-process)


def study_threads(requested: int, n_tasks: int) -> dict:
    """The thread layout a study's stages run with, for results.json."""
    return dict(torch_threads_per_process=THREADS_PER_PROCESS, worker_processes=n_workers(requested, n_tasks),
                cores=os.cpu_count())


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
                                              initializer=_init_worker, initargs=(os.getpid(),))
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
            torch.set_num_threads(THREADS_PER_PROCESS)
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
