"""The one dispatch point: which implementation of an op runs.

The registry `REGISTRY = {op: {backend: implementation}}` is filled by each op's wrapper module
(`bnmem_kernels/ops/<op>.py` calls `register(op, {...})` when imported) and read by the wrappers
(`dispatch`), by `python -m bnmem_kernels.info` and by the tests' backend grid
(`bnmem_kernels.testing`). All implementations of one op take the same arguments: anything that
changes how the op computes (such as the ghost-norm route) is decided once, in the wrapper, and
passed to whichever implementation runs.

Backends:
  cuda       compiled CUDA kernels in `bnmem_kernels._C` (CUDA tensors; built with a CUDA torch + nvcc)
  triton     Triton kernels (CUDA tensors; CPU tensors only under TRITON_INTERPRET=1, for tests)
  cpu        compiled C++/OpenMP kernels in `bnmem_kernels._C` (CPU tensors)
  reference  plain PyTorch, the definition (any device)

Choice, first match wins: the call's `backend=` argument, the BNMEM_BACKEND environment variable,
then "auto": on CUDA tensors cuda > triton > reference, on CPU tensors cpu > reference (the Triton
interpreter is for testing, never picked automatically). An explicitly requested backend that
cannot run raises BackendUnavailableError saying why and how to get it; nothing falls back
silently. Nothing here compiles or touches a GPU at import: the library loads on first use.
"""
from __future__ import annotations

import functools
import importlib
import os

import torch

BACKENDS = ("cuda", "triton", "cpu", "reference")
_AUTO_ORDER = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")}
ENV_VAR = "BNMEM_BACKEND"

_BUILD_HINT = ("build it with `pip install --no-build-isolation -e .` from the repository root "
               "(see README)")


class BackendUnavailableError(RuntimeError):
    """A backend was asked for that cannot run here; the message says why and what to do."""


# op -> {backend: implementation}; an implementation of None means the op's wrapper runs that
# backend itself (it dispatches by the name select_backend returns).
REGISTRY: dict[str, dict[str, object]] = {}

def register(op: str, implementations: dict) -> None:
    """Declare `op`'s backends: {backend: callable} (all callables with one signature). Called once by
    the op's wrapper module at import; registering the op again replaces its entry."""
    unknown = set(implementations) - set(BACKENDS)
    if unknown or not implementations:
        raise ValueError(f"register({op!r}): backends must be a non-empty subset of {BACKENDS}, "
                         f"got {tuple(implementations)}")
    REGISTRY[op] = {b: implementations[b] for b in BACKENDS if b in implementations}


def backends_of(op: str) -> tuple[str, ...]:
    """The backends `op` has, in the order of BACKENDS."""
    if op not in REGISTRY:
        raise ValueError(f"no op {op!r} is registered; registered ops: {', '.join(registered_ops())}")
    return tuple(REGISTRY[op])


def registered_ops() -> list[str]:
    """Every op of the library, by name. Importing the package imports every op's wrapper module
    (each public op is exported from bnmem_kernels/__init__.py), which registers it."""
    importlib.import_module("bnmem_kernels")
    return sorted(REGISTRY)


def dispatch(op: str, device, backend: str | None = None):
    """The implementation of `op` that runs on `device` (choice as in select_backend)."""
    chosen = select_backend(op, device, backend)
    impl = REGISTRY[op][chosen]
    if impl is None:
        raise RuntimeError(f"{op}: its wrapper runs backend {chosen!r} itself; call the wrapper")
    return impl


@functools.lru_cache(maxsize=None)
def load_library():
    """Import the compiled extension once. Returns (module or None, reason it failed or "")."""
    try:
        return importlib.import_module("bnmem_kernels._C"), ""
    except ImportError as exc:  # not built, or built against another torch
        return None, f"the compiled extension bnmem_kernels._C did not load ({exc}); {_BUILD_HINT}"


@functools.lru_cache(maxsize=None)
def compiled_op(name: str, fake):
    """torch.ops.bnmem.<name>.default (C++ CPU / CUDA kernels), its `register_fake` done once.

    Loads the extension on first use; raises BackendUnavailableError (with the reason) when it is
    not built.
    """
    lib, why = load_library()
    if lib is None:
        raise BackendUnavailableError(why)
    try:
        packet = getattr(torch.ops.bnmem, name)
    except (AttributeError, RuntimeError) as exc:   # an extension built from older sources
        raise BackendUnavailableError(f"the compiled extension bnmem_kernels._C has no op bnmem::{name} (built "
                                      f"from older sources?); re{_BUILD_HINT}") from exc
    torch.library.register_fake(f"bnmem::{name}")(fake)
    return packet.default


@functools.lru_cache(maxsize=None)
def _triton_status():
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return None, f"triton is not installed ({exc}); `pip install triton` (Linux)"
    return triton.__version__, ""


def triton_interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1 set before import)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def unavailable_reason(backend: str, device: torch.device) -> str:
    """Why `backend` cannot run on `device` ("" when it can)."""
    device = torch.device(device)
    if backend == "reference":
        return ""
    if backend == "cpu":
        if device.type != "cpu":
            return f"the cpu backend runs on CPU tensors, got {device}"
        return load_library()[1]
    if backend == "cuda":
        if device.type != "cuda":
            return f"the cuda backend runs on CUDA tensors, got {device}"
        lib, why = load_library()
        if lib is None:
            return why
        if not lib.built_with_cuda():
            return ("bnmem_kernels._C was built without CUDA sources; rebuild on a machine with a CUDA "
                    "torch and nvcc (BNMEM_FORCE_CUDA=1 pip install --no-build-isolation -e .)")
        return ""
    if backend == "triton":
        version, why = _triton_status()
        if version is None:
            return why
        if device.type == "cpu" and not triton_interpreting():
            return ("triton runs on CPU tensors only in its interpreter: set TRITON_INTERPRET=1 before "
                    "importing triton (slow; for tests)")
        if device.type not in ("cpu", "cuda"):
            return f"triton kernels need CUDA tensors, got {device}"
        return ""
    raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS} or 'auto'")


def available_backends(device) -> list[str]:
    return [b for b in BACKENDS if not unavailable_reason(b, device)]


def select_backend(op: str, device, backend: str | None = None, implemented=None) -> str:
    """The backend that runs `op` on `device`.

    `implemented` lists the backends this op has; None reads them from the registry (all four for
    an op that is not registered). An explicit request (argument or BNMEM_BACKEND) that is not
    implemented or not available raises BackendUnavailableError.
    """
    if implemented is None:
        implemented = tuple(REGISTRY[op]) if op in REGISTRY else BACKENDS
    device = torch.device(device)
    requested = backend if backend is not None else os.environ.get(ENV_VAR) or "auto"
    source = "backend=" if backend is not None else f"{ENV_VAR}="
    if requested == "auto":
        for b in _AUTO_ORDER.get(device.type, ("reference",)):
            if b in implemented and not unavailable_reason(b, device):
                return b
        return "reference"
    if requested not in BACKENDS:
        raise ValueError(f"{op}: unknown backend {source}{requested!r}; choose one of {BACKENDS} or 'auto'")
    if requested not in implemented:
        raise BackendUnavailableError(f"{op} has no {requested!r} implementation; it has {tuple(implemented)}")
    why = unavailable_reason(requested, device)
    if why:
        raise BackendUnavailableError(f"{op}: backend {requested!r} ({source}) is unavailable: {why}")
    return requested
