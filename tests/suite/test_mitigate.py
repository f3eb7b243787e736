"""Ghost batch norm (module, per-sample gradient norms) and the mitigation study."""
import csv
import json

import pytest
import torch
import torch.nn as nn

from bnmem import gradnorms, mitigate
from bnmem.config import build_config
from bnmem.errors import BnmemError
from bnmem.ghost_bn import GhostBatchNorm2d, parse_virtual_batch, split_sizes
from bnmem.models import build_model, freeze_batchnorm, has_batchnorm
from suite_helpers import MICRO


# -- ghost batch norm ---------------------------------------------------------------------------
def test_split_sizes():
    assert split_sizes(10, 4) == [4, 4, 2]
    assert split_sizes(9, 4) == [4, 5]   # a virtual batch of one is merged into the previous one
    assert split_sizes(8, 4) == [4, 4] and split_sizes(3, 4) == [3]
    assert parse_virtual_batch("gbn16") == 16 and parse_virtual_batch("bn") is None
    with pytest.raises(ValueError, match=">= 2"):
        parse_virtual_batch("gbn1")


def test_ghost_bn_matches_bn_per_virtual_batch():
    torch.manual_seed(0)
    g = GhostBatchNorm2d(3, 4, momentum=0.2)
    ref = nn.BatchNorm2d(3, momentum=0.2)
    with torch.no_grad():
        g.weight.uniform_(0.5, 2); g.bias.uniform_(-1, 1)
    ref.load_state_dict(g.state_dict())
    x = torch.randn(9, 3, 5, 5, dtype=torch.float32)
    y = g(x)
    expect = torch.cat([ref(x[:4]), ref(x[4:])])  # sizes [4, 5]; ref's running stats updated twice
    torch.testing.assert_close(y, expect, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g.running_mean, ref.running_mean)
    torch.testing.assert_close(g.running_var, ref.running_var)
    assert int(g.num_batches_tracked) == 2
    torch.testing.assert_close(g(x[:3]), ref(x[:3]))  # at most V samples: plain BN
    g.eval(); ref.eval()
    torch.testing.assert_close(g(x), ref(x))
    assert "virtual_batch_size=4" in repr(g)
    m = build_model("cnn", "gbn4", (1, 8, 8), 10, 4)
    assert has_batchnorm(m)
    freeze_batchnorm(m)  # frozen: running statistics, a sample's output ignores the others
    with torch.no_grad():
        xb = torch.randn(6, 1, 8, 8)
        torch.testing.assert_close(m(xb)[:2], m(xb[:2]))


def _hand_norms(model, x, y, *, detach_stats):
    """Autograd loop over samples; detach_stats: every ghost BN's virtual-batch statistics constant.
    Runs on a copy (a train-mode forward updates running statistics)."""
    import copy
    model = copy.deepcopy(model)
    handles = []
    if detach_stats:
        def hook(mod, args, out):
            xx = args[0]
            parts = []
            for c in xx.split(split_sizes(xx.shape[0], mod.virtual_batch_size)):
                var, mean = torch.var_mean(c.detach(), dim=(0, 2, 3), correction=0, keepdim=True)
                parts.append((c - mean) * torch.rsqrt(var + mod.eps))
            return torch.cat(parts) * mod.weight.view(1, -1, 1, 1) + mod.bias.view(1, -1, 1, 1)
        handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, GhostBatchNorm2d)]
    try:
        losses = gradnorms.per_sample_ce(model(x), y)
        params = [p for p in model.parameters() if p.requires_grad]
        return torch.stack([torch.sqrt(sum(g.square().sum() for g in torch.autograd.grad(
            losses[i], params, retain_graph=True))) for i in range(len(y))])
    finally:
        for h in handles:
            h.remove()


@pytest.fixture(scope="module")
def ghost_model():
    torch.manual_seed(0)
    m = build_model("cnn", "gbn4", (1, 6, 6), 10, 4).double()
    x, y = torch.randn(11, 1, 6, 6, dtype=torch.float64), torch.arange(11) % 10
    return m, x, y


@pytest.mark.parametrize("mode", ["column", "eval", "detached"])
def test_ghost_bn_per_sample_grad_norms(ghost_model, mode):
    """bnmem_kernels.per_sample_grad_norms (the rule registered by ghost_bn.py) vs autograd."""
    import bnmem_kernels
    from bnmem_kernels import reference
    m, x, y = ghost_model
    before = {k: v.clone() for k, v in m.state_dict().items()}
    got = bnmem_kernels.per_sample_grad_norms(m, gradnorms.per_sample_ce, x, y, mode=mode)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())  # running stats untouched
    if mode == "detached":
        m.train()
        ref = _hand_norms(m, x, y, detach_stats=True)
    else:
        ref = reference.per_sample_grad_norms(m, gradnorms.per_sample_ce, x, y, mode=mode)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=0)


def test_ghost_bn_step_probe_and_reference_exact(ghost_model):
    import bnmem_kernels
    from bnmem_kernels import reference
    m, x, y = ghost_model
    m.train()
    with bnmem_kernels.GradNormProbe(m, mode="column") as p:
        gradnorms.per_sample_ce(m(x), y).mean().backward()
    m.zero_grad(set_to_none=True)
    ref = reference.per_sample_grad_norms(m, gradnorms.per_sample_ce, x, y, mode="column")
    torch.testing.assert_close(p.norms, ref, rtol=1e-10, atol=0)
    exact = reference.per_sample_grad_norms(m, gradnorms.per_sample_ce, x, y, mode="exact")
    torch.testing.assert_close(exact, _hand_norms(m, x, y, detach_stats=False), rtol=1e-10, atol=0)


# -- arms ----------------------------------------------------------------------------------------
def test_default_arms_and_grouping():
    base = build_config(quick=True)  # epochs 4, batch 32
    arms = mitigate.default_arms(base)
    names = [a.name for a in arms]
    assert names == ["bn", "gn", "ln", "bn-batch128", "ghost-bn-v8", "bn-freeze-after-1", "bn-eval-last-1"]
    cfgs = mitigate.arm_configs(base, arms)
    assert cfgs["base"].variants == ["bn", "gn", "ln"] and cfgs["base"].batch_size == 32
    assert cfgs["batchsize128"].batch_size == 128 and cfgs["ghost-gbn8"].exact_models == 0
    assert cfgs["frozenwarmupepochs1"].frozen_warmup_epochs == 1
    assert cfgs["frozenwarmupepochs3"].frozen_warmup_epochs == 3
    assert len({c.hash() for c in cfgs.values()}) == len(cfgs)
    for bad, match in ((dict(kinds=("gn",)), "needs the bn arm"), (dict(kinds=("bn", "dropout")), "unknown"),
                       (dict(virtual_batch=32), "virtual-batch"), (dict(batch_factor=1), "batch-factor"),
                       (dict(freeze_after=4), "freeze-after"), (dict(eval_last=0), "eval-last")):
        with pytest.raises(BnmemError, match=match):
            mitigate.default_arms(base, **bad)


def test_mitigation_study_micro(tmp_path):
    """Two arms (bn and ghost BN) end to end on the micro config: table, CSV, plot, index."""
    base = build_config(overrides={**MICRO, "variants": ["bn"], "epochs": 1, "bootstrap": 5})
    arms = mitigate.default_arms(base, kinds=("bn", "ghost"), virtual_batch=4)
    st = mitigate.run_study(base, arms, str(tmp_path), log=lambda *a: None)
    rows = {r["arm"]: r for r in st["rows"]}
    assert set(rows) == {"bn", "ghost-bn-v4"}
    for r in rows.values():
        assert 0 <= r["test_acc"] <= 1 and 0 <= r["tpr@0.001"] <= r["tpr@0.01"] <= 1 and 0 <= r["auc"] <= 1
        assert -1 <= r["mem_ood"] <= 1 and r["gradnorm_ratio_ood"] > 0
        assert r["tpr@0.001_batchstats"] is not None  # both are BN-like: batch-statistics queries too
        lo, hi = r["mem_ood_ci"]
        assert lo <= r["mem_ood"] <= hi
    assert rows["bn"]["test_acc_vs_bn"] == 0
    out = tmp_path
    assert (out / "mitigation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = list(csv.DictReader((out / "mitigation.csv").open()))
    assert [r["arm"] for r in table] == ["bn", "ghost-bn-v4"]
    md = (out / "mitigation.md").read_text()
    assert "TPR@0.1% FPR" in md and "## Index of runs" in md and "runs/ghost-gbn4/report.md" in md
    assert (out / "runs" / "ghost-gbn4" / "report.md").exists()
    saved = json.loads((out / "mitigation.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(st["rows"]))
    # a rerun resumes: nothing is retrained
    mt = (out / "runs" / "base" / "models" / "bn" / "m000.pt").stat().st_mtime_ns
    mitigate.run_study(base, arms, str(tmp_path), log=lambda *a: None)
    assert (out / "runs" / "base" / "models" / "bn" / "m000.pt").stat().st_mtime_ns == mt


@pytest.mark.slow
def test_mitigation_cli_quick(tmp_path):
    """`bnmem mitigate --quick` with every arm (a few minutes on 2 cores)."""
    from suite_helpers import run_cli
    proc = run_cli("mitigate", "--quick", "--out", str(tmp_path / "m"), "--no-progress", timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader((tmp_path / "m" / "mitigation.csv").open()))
    assert len(rows) == 7
