"""`python -m bnmem_kernels.demo`: per-sample gradient norms of a Linear classifier on the digits
data shipped with scikit-learn, from one backward pass, checked against a loop of B autograd calls.

    per-sample loss l_i = cross_entropy(W x_i + b, y_i);   A_i = x_i,  G_i = dl_i/dz_i
    ||dl_i/dW||^2 = ghost_norm_linear(A, G)[i],             ||dl_i/db||^2 = ||G_i||^2
"""
from __future__ import annotations

import argparse
import time

import torch

from . import ghost_norm_linear


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bnmem_kernels.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--backend", default=None, help="cuda | triton | cpu | reference (default: auto)")
    args = parser.parse_args(argv)

    try:
        from sklearn.datasets import load_digits
    except ImportError:
        parser.error("the demo reads scikit-learn's digits data: pip install scikit-learn (or the suite extra, "
                     "pip install -e '.[suite]')")

    digits = load_digits()
    x = torch.tensor(digits.data[: args.batch], dtype=torch.float64) / 16.0
    y = torch.tensor(digits.target[: args.batch])
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 10).double()

    ghost_norm_linear(x[:1, None], x[:1, None, :10], backend=args.backend)  # load the kernels before timing
    t0 = time.perf_counter()
    z = layer(x)
    losses = torch.nn.functional.cross_entropy(z, y, reduction="none")
    g = torch.autograd.grad(losses.sum(), z, retain_graph=True)[0]            # one backward pass
    fast = ghost_norm_linear(x, g, backend=args.backend) + g.square().sum(1)  # weight + bias
    t_fast = time.perf_counter() - t0

    t0 = time.perf_counter()
    loop = torch.stack([sum(p.square().sum() for p in torch.autograd.grad(losses[i], list(layer.parameters()),
                                                                           retain_graph=True))
                        for i in range(len(x))])
    t_loop = time.perf_counter() - t0
    err = ((fast - loop).abs() / loop).max().item()
    print(f"digits: B = {len(x)}, Linear(64, 10), fp64")
    print(f"per-sample grad norm: min {fast.sqrt().min():.4f}  median {fast.sqrt().median():.4f}  "
          f"max {fast.sqrt().max():.4f}")
    print(f"one pass + ghost_norm_linear: {t_fast * 1e3:.2f} ms;  autograd loop of {len(x)} calls: "
          f"{t_loop * 1e3:.1f} ms ({t_loop / t_fast:.0f}x)")
    print(f"max relative error vs autograd: {err:.2e}")
    if not err < 1e-10:
        print("FAILED: the fast norms disagree with autograd")
        return 1
    print("OK: matches autograd to 1e-10")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
