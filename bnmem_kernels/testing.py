"""Test grid shared by every kernel test: devices x backends x dtypes, and per-dtype tolerances.

Tolerances are relative errors against an fp64 ground truth computed from the same (rounded)
inputs. They are statements of what each precision can deliver, not knobs: do not loosen them to
make a test pass.
"""
from __future__ import annotations

import torch

from . import _backend

DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)

# Relative tolerance of a reduction computed from inputs in that dtype (accumulating in fp32 for
# fp32/bf16/fp16, fp64 for fp64) against fp64 on the same values. Low-precision rows cover the
# rounding of intermediate values stored in that dtype (e.g. an activation gradient in bf16).
RTOL = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.bfloat16: 2e-2,
    torch.float16: 5e-3,
}


def devices() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _implemented(op_or_backends) -> tuple:
    """An op's name -> its backends from the dispatch registry; a tuple of backends -> itself."""
    if isinstance(op_or_backends, str):
        _backend.registered_ops()
        return _backend.backends_of(op_or_backends)
    return tuple(op_or_backends)


def backend_params(device: str = "cpu", implemented=_backend.BACKENDS):
    """pytest params for every backend of an op on `device`; unavailable ones skip with the reason.
    `implemented`: the op's name (its backends are read from the dispatch registry) or a tuple."""
    import pytest

    implemented = _implemented(implemented)
    params = []
    for b in implemented:
        why = _backend.unavailable_reason(b, device)
        params.append(pytest.param(b, id=b, marks=pytest.mark.skipif(bool(why), reason=why or "available")))
    return params


def device_backend_params(implemented=_backend.BACKENDS):
    """(device, backend) params over CPU and CUDA; CUDA ones skip cleanly without a GPU.
    `implemented`: the op's name (its backends are read from the dispatch registry) or a tuple."""
    import pytest

    implemented = _implemented(implemented)
    params = []
    for device in ("cpu", "cuda"):
        for b in implemented:
            if device == "cpu" and b == "cuda" or device == "cuda" and b == "cpu":
                continue
            why = "no CUDA GPU" if device == "cuda" and not torch.cuda.is_available() else \
                _backend.unavailable_reason(b, device)
            params.append(pytest.param(device, b, id=f"{device}-{b}",
                                       marks=pytest.mark.skipif(bool(why), reason=why or "available")))
    return params


def max_rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max_i |actual_i - expected_i| / max(|expected_i|, tiny), in fp64."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    if a.numel() == 0:
        return 0.0
    return ((a - e).abs() / e.abs().clamp_min(torch.finfo(torch.float64).tiny)).max().item()
