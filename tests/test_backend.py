"""The dispatch point: selection order, environment override, clear errors, lazy loading."""
import os
import subprocess
import sys

import pytest
import torch

import bnmem_kernels as bk
from bnmem_kernels import _backend


def test_import_is_lazy():
    code = ("import sys, bnmem_kernels, bnmem; "
            "bad = [m for m in ('bnmem_kernels._C', 'triton') if m in sys.modules]; "
            "assert not bad, bad; import torch; assert not torch.cuda.is_initialized()")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.skipif(bool(_backend.unavailable_reason("cpu", "cpu")), reason="extension not built")
def test_auto_picks_cpu_kernel_on_cpu_tensors(monkeypatch):
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    assert bk.select_backend("op", "cpu") == "cpu"
    assert bk.select_backend("op", "cpu", implemented=("triton", "reference")) == "reference"


def test_env_var_and_argument(monkeypatch):
    monkeypatch.setenv(_backend.ENV_VAR, "reference")
    assert bk.select_backend("op", "cpu") == "reference"
    monkeypatch.setenv(_backend.ENV_VAR, "nonsense")
    with pytest.raises(ValueError, match="BNMEM_BACKEND"):
        bk.select_backend("op", "cpu")
    assert bk.select_backend("op", "cpu", backend="reference") == "reference"  # argument wins


def test_unavailable_backends_say_why(monkeypatch):
    with pytest.raises(bk.BackendUnavailableError, match="CUDA tensors"):
        bk.select_backend("op", "cpu", backend="cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(bk.BackendUnavailableError, match="TRITON_INTERPRET=1"):
        bk.select_backend("op", "cpu", backend="triton")
    with pytest.raises(bk.BackendUnavailableError, match="no 'cpu' implementation"):
        bk.select_backend("op", "cpu", backend="cpu", implemented=("reference",))


def test_missing_extension_message(monkeypatch):
    _backend.load_library.cache_clear()
    real_import = _backend.importlib.import_module

    def fail(name):
        if name == "bnmem_kernels._C":
            raise ImportError("simulated")
        return real_import(name)

    monkeypatch.setattr(_backend.importlib, "import_module", fail)
    try:
        why = _backend.unavailable_reason("cpu", "cpu")
        assert "did not load" in why and "pip install --no-build-isolation" in why
        with pytest.raises(bk.BackendUnavailableError, match="did not load"):
            bk.select_backend("op", "cpu", backend="cpu")
        monkeypatch.delenv(_backend.ENV_VAR, raising=False)
        assert bk.select_backend("op", "cpu") == "reference"  # auto: the reference, never an error
    finally:
        monkeypatch.undo()
        _backend.load_library.cache_clear()


def test_info_runs():
    env = dict(os.environ)
    out = subprocess.run([sys.executable, "-m", "bnmem_kernels.info"], check=True, capture_output=True, text=True,
                         env=env).stdout
    assert "ghost_norm_linear" in out and "backends:" in out and torch.__version__ in out


def test_info_reports_cpu_simd_build_and_pass_threads(monkeypatch):
    from bnmem_kernels import info

    d = info.collect()
    if _backend.load_library()[0] is not None:
        assert d["extension_cpu_simd"] in ("avx2+fma", "baseline")
        monkeypatch.setenv("BNMEM_CPU_ISA", "baseline")
        assert info.collect()["extension_cpu_simd"] == "baseline"
    assert d["exact_pass_threads"] == torch.get_num_threads()
    monkeypatch.setenv("BNMEM_PASS_THREADS", "0")
    assert info.collect()["exact_pass_threads"].startswith("error: BNMEM_PASS_THREADS")


def test_cli_info():
    out = subprocess.run(["bnmem", "info"], check=True, capture_output=True, text=True).stdout
    assert "bnmem" in out and "ghost_norm_linear" in out


def test_op_missing_from_a_stale_extension_says_rebuild():
    """An extension built from older sources lacks newer ops: a clear BackendUnavailableError, not an
    AttributeError from torch.ops."""
    if _backend.load_library()[0] is None:
        pytest.skip("extension not built")
    with pytest.raises(_backend.BackendUnavailableError, match="no op bnmem::not_an_op.*rebuild"):
        _backend.compiled_op("not_an_op", lambda *a: None)


# ---------------------------------------------------------------- the dispatch registry
OPS = {"ghost_norm_linear", "conv_weight_grad_sq", "norm_affine_grad_sq", "pooled_conv_weight_grad",
       "logit_confidence", "lira_scores", "rmia_scores", "roc_curve"}


def test_registry_lists_every_op_and_info_reads_it():
    from bnmem_kernels import info

    assert set(_backend.registered_ops()) == OPS
    assert set(info.collect()["ops"]) == OPS
    for op in OPS - {"rmia_scores", "roc_curve"}:
        assert _backend.backends_of(op) == _backend.BACKENDS, op
    assert _backend.backends_of("rmia_scores") == ("reference",)
    assert not hasattr(info, "OPS")        # no second, hand-kept table


def test_registry_drives_selection_and_dispatch(monkeypatch):
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    _backend.registered_ops()
    monkeypatch.setitem(_backend.REGISTRY, "toy", {"reference": lambda x: x + 1})
    assert _backend.select_backend("toy", "cpu") == "reference"     # its only backend, also when cpu is built
    assert _backend.dispatch("toy", "cpu")(1) == 2
    with pytest.raises(bk.BackendUnavailableError, match="no 'cpu' implementation"):
        _backend.select_backend("toy", "cpu", backend="cpu")
    with pytest.raises(ValueError, match="no op 'nope' is registered"):
        _backend.backends_of("nope")
    with pytest.raises(ValueError, match="non-empty subset"):
        _backend.register("bad", {"gpu": print})


def test_backend_grid_reads_the_registry(monkeypatch):
    from bnmem_kernels import testing

    ids = [p.id for p in testing.device_backend_params("ghost_norm_linear")]
    assert ids == ["cpu-triton", "cpu-cpu", "cpu-reference", "cuda-cuda", "cuda-triton", "cuda-reference"]
    assert [p.id for p in testing.backend_params("cpu", "rmia_scores")] == ["reference"]
