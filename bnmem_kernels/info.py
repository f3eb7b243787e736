"""`python -m bnmem_kernels.info`: versions, what was built, and which backend each op uses."""
from __future__ import annotations

import os
import platform
import sys

import torch

from . import _backend

def _cuda_sources():
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc", "cuda")
    return sorted(f for f in os.listdir(root) if f.endswith(".cu")) if os.path.isdir(root) else []


def _pass_threads():
    """Worker threads of exact mode's CPU backward passes (norms/_parallel; BNMEM_PASS_THREADS)."""
    from .norms._parallel import pass_workers

    try:
        return pass_workers("cpu")
    except ValueError as exc:   # a bad BNMEM_PASS_THREADS shows here rather than crashing info
        return f"error: {exc}"


def collect() -> dict:
    """Everything `info` prints, as a dict (also written into benchmark and run reports)."""
    lib, why = _backend.load_library()
    version, twhy = _backend._triton_status()
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    info = {
        "bnmem_kernels": __import__("bnmem_kernels").__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch_threads": torch.get_num_threads(),
        "triton": version or f"unavailable: {twhy}",
        "triton_interpret": _backend.triton_interpreting(),
        "extension": "loaded" if lib is not None else f"unavailable: {why}",
        "extension_cuda": bool(lib is not None and lib.built_with_cuda()),
        "extension_openmp_threads": lib.openmp_max_threads() if lib is not None else None,
        "extension_cpu_simd": (lib.cpu_simd() if hasattr(lib, "cpu_simd") else "unknown (rebuild)")
        if lib is not None else None,
        "exact_pass_threads": _pass_threads(),
        "cuda_sources": _cuda_sources(),
        "env_backend": os.environ.get(_backend.ENV_VAR),
        "backends": {d: {b: (_backend.unavailable_reason(b, d) or "available") for b in _backend.BACKENDS}
                     for d in devices},
        "ops": {},
    }
    for op in _backend.registered_ops():      # the dispatch registry: one row per op
        info["ops"][op] = {}
        for d in devices:
            try:
                info["ops"][op][d] = _backend.select_backend(op, d)
            except Exception as exc:  # a bad BNMEM_BACKEND shows here rather than crashing info
                info["ops"][op][d] = f"error: {exc}"
    return info


def main() -> None:
    info = collect()
    print("bnmem_kernels", info["bnmem_kernels"])
    for key in ("python", "platform", "torch", "torch_cuda", "cuda_available", "gpu", "torch_threads",
                "triton", "triton_interpret", "extension", "extension_cuda", "extension_openmp_threads",
                "extension_cpu_simd", "exact_pass_threads", "env_backend"):
        print(f"  {key:26s} {info[key]}")
    print(f"  {'cuda sources':26s} {', '.join(info['cuda_sources']) or '-'}"
          + ("" if info["extension_cuda"] else "  (not compiled into this build)"))
    print("backends:")
    for dev, rows in info["backends"].items():
        for b, state in rows.items():
            print(f"  {dev:5s} {b:10s} {state}")
    print("ops (backend chosen by auto / BNMEM_BACKEND):")
    for op, per_dev in info["ops"].items():
        print(f"  {op:26s} " + "  ".join(f"{d}: {b}" for d, b in per_dev.items()))


if __name__ == "__main__":
    main()
