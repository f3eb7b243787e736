"""map_passes: independent backward passes on worker threads (CPU), as used by the exact engines."""
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnmem_kernels as bk
from bnmem_kernels.norms import _parallel
from bnmem_kernels.norms.exact import exact_report
from bnmem_kernels.reference import per_sample_grad_norms as reference


def test_results_in_order_on_worker_threads_and_threads_restored():
    old = torch.get_num_threads()
    seen = []

    def fn(i):
        seen.append((threading.current_thread().name, torch.get_num_threads()))
        return i * i

    items = list(range(37))
    assert _parallel.map_passes(fn, items, "cpu") == [i * i for i in items]
    assert torch.get_num_threads() == old
    if _parallel.pass_workers("cpu") > 1:
        assert any(name.startswith("bnmem-pass") for name, _ in seen)
        assert all(n == 1 for _, n in seen)          # one intra-op thread per worker


def test_few_passes_run_as_a_plain_loop():
    names = []
    _parallel.map_passes(lambda i: names.append(threading.current_thread().name), range(3), "cpu")
    assert all(n == threading.current_thread().name for n in names)


def test_error_in_a_pass_propagates_and_threads_are_restored():
    old = torch.get_num_threads()

    def fn(i):
        if i == 11:
            raise RuntimeError("pass 11 failed")
        return i

    with pytest.raises(RuntimeError, match="pass 11 failed"):
        _parallel.map_passes(fn, range(40), "cpu")
    assert torch.get_num_threads() == old


def test_env_override_and_bad_value(monkeypatch):
    monkeypatch.setenv("BNMEM_PASS_THREADS", "1")
    assert _parallel.pass_workers("cpu") == 1
    monkeypatch.setenv("BNMEM_PASS_THREADS", "3")
    assert _parallel.pass_workers("cpu") == 3
    for bad in ("0", "-2", "two"):
        monkeypatch.setenv("BNMEM_PASS_THREADS", bad)
        with pytest.raises(ValueError, match="BNMEM_PASS_THREADS"):
            _parallel.pass_workers("cpu")


@pytest.mark.parametrize("path", ["seed_batched", "coupled"])
def test_exact_on_workers_matches_the_loop_and_one_worker(monkeypatch, path):
    """The exact engines' passes on 3 workers give the loop's numbers (fp64) and those of one worker."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 5, 3), nn.BatchNorm2d(5),
                          nn.ReLU(), nn.Flatten(), nn.Linear(5 * 16, 3)).double()
    x = torch.randn(17, 2, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 3, (17,))
    ce = lambda o, t: F.cross_entropy(o, t, reduction="none")   # noqa: E731
    exp = reference(model, ce, x, y, mode="exact")
    monkeypatch.setenv("BNMEM_PASS_THREADS", "3")
    (many, rep) = exact_report(model, ce, x, y, path=path, route="B" if path == "coupled" else None)
    monkeypatch.setenv("BNMEM_PASS_THREADS", "1")
    one = exact_report(model, ce, x, y, path=path, route="B" if path == "coupled" else None)[0]
    assert rep["path"] == path
    assert ((many - exp).abs() / exp).max() <= 1e-10
    assert ((many - one).abs() / one).max() <= 1e-12
    assert bk.per_sample_grad_norms(model, ce, x, y, mode="exact").shape == (17,)


def test_concurrent_calls_restore_the_thread_count():
    """Two map_passes calls from two user threads at once (their passes overlap in time): torch's
    thread count comes back to what it was before the first, whichever finishes last."""
    import time

    if _parallel.pass_workers("cpu") < 2:
        pytest.skip("one worker: map_passes is a plain loop")
    old = torch.get_num_threads()
    results = {}

    def slow(i):
        time.sleep(0.01)
        return i

    def caller(k):
        results[k] = _parallel.map_passes(slow, range(16), "cpu")

    ts = [threading.Thread(target=caller, args=(k,)) for k in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout=30)
    assert results == {0: list(range(16)), 1: list(range(16))}
    assert torch.get_num_threads() == old
