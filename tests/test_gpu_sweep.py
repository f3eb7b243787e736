"""bench/gpu_sweep.py: passes correct backends, catches a wrong or raising one, keeps going, one JSON."""
import importlib.util
import json
import os

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("gpu_sweep", os.path.join(ROOT, "bench", "gpu_sweep.py"))
sweep = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sweep)


def _args(**kw):
    base = dict(device="cpu", ops="ghost_norm_linear", backends="cpu,reference", dtypes="fp64,fp32", tiny=True,
                budget=0, all_dtypes=False, out=None)
    base.update(kw)
    return type("A", (), base)()


def test_real_op_passes_on_cpu_backends():
    report = sweep.run(_args())
    s = report["ops"]["ghost_norm_linear"]
    assert report["n_failed"] == 0 and s["passed"] > 0 and s["first_failure"] is None
    assert {c["backend"] for c in report["cases"]} == {"cpu", "reference"} or "cpu" not in report["available_backends"]
    json.dumps(report)


def test_wrong_and_raising_backends_are_caught_and_the_sweep_goes_on(monkeypatch):
    real = sweep.BUILDERS["ghost_norm_linear"]

    def planted(tiny, gen):
        for label, inputs, call in real(tiny, gen):
            def bad(t, be, call=call):
                out = call(t, "reference")
                if be == "cpu" and out.dtype == torch.float32:
                    raise RuntimeError("planted failure")
                return out * (1 + 1e-6) if be == "cpu" else out   # 1e-6: wrong at fp64's tolerance only
            yield label, inputs, bad

    monkeypatch.setitem(sweep.BUILDERS, "ghost_norm_linear", planted)
    report = sweep.run(_args(backends="cpu,reference"))
    s = report["ops"]["ghost_norm_linear"]
    bad = [c for c in report["cases"] if not c["ok"]]
    assert {(c["backend"], c["dtype"]) for c in bad} == {("cpu", "fp64"), ("cpu", "fp32")}
    assert any("planted failure" in c.get("error", "") for c in bad)
    assert s["first_failure"]["backend"] == "cpu" and s["passed"] == s["cases_run"] * 2   # reference rows all ran
    assert report["n_failed"] == 2 * s["cases_run"]


def test_budget_stop_is_reported():
    report = sweep.run(_args(budget=1e-9))
    assert "stopped" in report
