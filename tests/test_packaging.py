"""The kernel library installs and imports without the experiment suite's dependencies."""
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUITE_ONLY = ("matplotlib", "mlxtend", "sklearn", "PIL", "tqdm", "scipy")

# Runs in a fresh interpreter where importing any suite-only module raises ImportError.
_SCRIPT = textwrap.dedent(f"""
    import importlib.abc, sys
    BLOCKED = {SUITE_ONLY!r}

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"blocked for this test: {{name}}")
            return None

    sys.meta_path.insert(0, Block())
    import torch
    import bnmem_kernels as bk
    from bnmem_kernels import info

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.BatchNorm1d(4), torch.nn.ReLU(),
                                torch.nn.Linear(4, 3)).double()
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    ce = lambda o, t: torch.nn.functional.cross_entropy(o, t, reduction="none")
    for mode in ("exact", "column"):
        n = bk.per_sample_grad_norms(model, ce, x, y, mode=mode)
        assert n.shape == (6,) and bool(torch.isfinite(n).all()), (mode, n)
    conf = bk.lira.logit_confidence(torch.randn(8, 10, 1, 3, dtype=torch.float64),
                                    torch.randint(0, 3, (8, 10, 1)))
    keep = torch.zeros(8, 10, dtype=torch.bool)
    keep[:4] = True
    s = bk.lira.lira_scores(conf, keep)
    assert s.shape == (8, 10)
    bk.metrics.roc_auc(s.flatten(), keep.flatten())
    info.collect()
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    assert not loaded, loaded
    print("ok")
""")


def test_kernel_library_needs_no_suite_dependency():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout + r.stderr


def test_core_dependencies_exclude_the_suite():
    tomllib = pytest.importorskip("tomllib")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    names = {d.split(";")[0].split(">")[0].split("=")[0].split("<")[0].strip().lower()
             for d in project["dependencies"]}
    assert names <= {"torch", "numpy", "triton"}, names
    assert {"matplotlib", "mlxtend", "scikit-learn", "pillow", "tqdm", "scipy"} <= {
        d.split(">")[0].split("=")[0].split(";")[0].strip().lower() for d in project["optional-dependencies"]["suite"]}
