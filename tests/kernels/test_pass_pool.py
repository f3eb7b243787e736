"""PassPool: the worker threads of the exact engines' passes are per object, with an explicit end."""
import threading

import torch

from bnmem_kernels.norms import _parallel


def _pass_threads():
    return {t for t in threading.enumerate() if t.name.startswith("bnmem-pass")}


def test_private_pool_runs_and_shuts_down(monkeypatch):
    monkeypatch.setenv("BNMEM_PASS_THREADS", "2")
    before = _pass_threads()
    pool = _parallel.PassPool()
    threads = torch.get_num_threads()
    assert _parallel.map_passes(lambda i: i + 1, range(10), "cpu", pool=pool) == list(range(1, 11))
    mine = _pass_threads() - before
    assert mine, "two workers were asked for: the pool should have started threads"
    assert torch.get_num_threads() == threads
    pool.shutdown()
    assert not any(t.is_alive() for t in mine)
    assert pool.map(lambda i: -i, range(8), "cpu") == [-i for i in range(8)]   # usable again
    pool.shutdown()


def test_release_pass_threads_then_reuse(monkeypatch):
    monkeypatch.setenv("BNMEM_PASS_THREADS", "2")
    assert _parallel.map_passes(lambda i: 2 * i, range(8), "cpu") == [2 * i for i in range(8)]
    _parallel.release_pass_threads()
    assert not _parallel.DEFAULT_POOL._executors
    assert _parallel.map_passes(lambda i: 3 * i, range(8), "cpu") == [3 * i for i in range(8)]
