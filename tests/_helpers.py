"""Helpers shared by several test files (importable in any pytest import mode: pyproject's
`pythonpath` puts tests/ on sys.path). Test files must not import each other."""
import torch
import torch.nn.functional as F


def ce(o, t):
    """Per-sample cross-entropy, the loss of the exact-mode tests."""
    return F.cross_entropy(o, t, reduction="none")


def data(shape, B, k, dtype=torch.float64, seed=1):
    """Seeded inputs [B, *shape] and integer targets in [0, k)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, *shape, generator=g, dtype=dtype), torch.randint(0, k, (B,), generator=g)


def rel(a, b):
    """Largest elementwise relative error of a against b, in fp64."""
    return ((a.double() - b.double()).abs() / b.double().abs()).max().item()
