"""Ghost batch norm (module, per-sample gradient norms) and the mitigation study (arms, pairing,
DP-SGD arms, the paired bootstrap and the computed verdicts)."""
import csv
import json
import math
import os
import warnings

import numpy as np

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
    base = mitigate.base_config(quick=True, overrides={"epochs": 8})  # batch 32, n = (200 + 40) / 2 = 120 per model
    arms = mitigate.default_arms(base)
    names = [a.name for a in arms]
    assert names == ["bn", "gn", "ln", "bn-batch128", "bn-freeze-2", "bn-evaltail-2",
                     "gn-dp-eps1", "gn-dp-eps4", "gn-dp-eps8"]
    assert not any("ghost" in n for n in names)  # ghost BN is a dose of the mechanism, not a mitigation
    cfgs = mitigate.arm_configs(base, arms)
    assert cfgs["base"].variants == ["bn", "gn", "ln", "gn-dp1", "gn-dp4", "gn-dp8"] and cfgs["base"].batch_size == 32
    big = next(c for n, c in cfgs.items() if n.startswith("batchsize128"))
    # same number of steps: 8 epochs x ceil(120 / 32) = 32 = 32 epochs x ceil(120 / 128); lr x sqrt(4)
    assert big.batch_size == 128 and big.epochs * math.ceil(120 / 128) == 8 * math.ceil(120 / 32)
    assert big.lr == pytest.approx(base.lr * 2)
    assert cfgs["frozenwarmupepochs2"].frozen_warmup_epochs == 2 and cfgs["frozenwarmupepochs2"].variants == ["bn-frozen-pop"]
    assert cfgs["frozenwarmupepochs6"].frozen_warmup_epochs == 6
    assert len({c.hash() for c in cfgs.values()}) == len(cfgs)
    for bad, match in ((dict(kinds=("gn",)), "needs the bn arm"), (dict(kinds=("bn", "ghost")), "unknown"),
                       (dict(batch_factor=1), "batch-factor"), (dict(freeze_after=8), "freeze-after"),
                       (dict(eval_tail=0), "eval-tail"), (dict(freeze_after=4, eval_tail=4), "same arm"),
                       (dict(epsilons=()), "at least one"), (dict(epsilons=(1, -2)), "positive"),
                       (dict(epsilons=(4, 4.0)), "twice")):
        with pytest.raises(BnmemError, match=match):
            mitigate.default_arms(base, **bad)


@pytest.fixture(scope="module")
def micro_root(tmp_path_factory):
    """data.npz of the micro config, for single-model training tests."""
    from bnmem import data as data_stage
    from bnmem.runfolder import write_npz
    cfg = build_config(overrides={**MICRO, "epochs": 3})
    root = tmp_path_factory.mktemp("micro")
    arrays, _ = data_stage.build(cfg)
    write_npz(str(root / "data.npz"), **arrays)
    return str(root), cfg


def test_batch_order_identical_across_arms(micro_root, monkeypatch):
    """Model m of every non-DP arm trains on bn's model m's batches, in the same order: recorded by a
    forward hook on the model (the inputs of every gradient-enabled training forward), and by the trace's
    per-epoch order digests; also with and without the exact-norm schedule (its probe batch used to
    consume the order generator: ghost BN's exact_models=0 saw another order than bn)."""
    import bnmem.train as train
    from bnmem.runfolder import read_npz
    root, cfg = micro_root
    seen = {}
    real_build = train.build_model

    def spy_build(arch, variant, *a, **k):
        model = real_build(arch, variant, *a, **k)
        calls = seen.setdefault(current[0], [])
        model.register_forward_pre_hook(
            lambda mod, args: calls.append(args[0].detach().clone()) if torch.is_grad_enabled() and mod.training else None)
        return model
    monkeypatch.setattr(train, "build_model", spy_build)
    current = [None]
    # as the mitigation arms train (mitigate._ARMS_AS_TRAINED): no per-step influence, whose extra
    # forwards the hook would record too
    base = {**cfg.hashed_dict(), "data_dir": None, "exact_models": 0, "influence_points": 0}
    runs = {"bn": ("bn", base), "gn": ("gn", base), "ln": ("ln", base),
            "freeze": ("bn-frozen-pop", {**base, "frozen_warmup_epochs": 1}),
            "bn-exact": ("bn", {**base, "exact_models": 1})}
    digests = {}
    for name, (variant, cd) in runs.items():
        current[0] = name
        sub = os.path.join(root, name)
        os.makedirs(sub, exist_ok=True)
        if not os.path.exists(os.path.join(sub, "data.npz")):
            os.symlink(os.path.join(root, "data.npz"), os.path.join(sub, "data.npz"))
        train.train_one(sub, cd, variant, 0)
        digests[name] = list(read_npz(train.model_paths(sub, variant, 0)[1])["order_digest"])
    assert len(digests["bn"]) == cfg.epochs
    for name in runs:
        assert digests[name] == digests["bn"], name
    ref = seen["bn"]
    assert len(ref) >= cfg.epochs * 2
    for name in ("gn", "ln", "freeze"):  # no exact schedule: every gradient-enabled forward is a training step
        assert len(seen[name]) == len(ref) and all(torch.equal(a, b) for a, b in zip(seen[name], ref)), name
    # the digests are of the order the generator of (seed, m) gives, independent of the arm
    d = read_npz(os.path.join(root, "data.npz"))
    rng = np.random.default_rng(train.seeds_for(cfg, 0)[1])
    idx = np.flatnonzero(d["keep"][0])
    assert digests["bn"] == [train.order_digest(rng.permutation(idx)) for _ in range(cfg.epochs)]


def test_recompute_bn_statistics():
    """Population statistics at the freeze: the cumulative average over the training set's batches of each
    BN layer's batch mean / unbiased variance (layer 2 sees layer 1 normalized by batch statistics)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 3), nn.BatchNorm1d(3, momentum=0.3))
    x = torch.randn(23, 5, dtype=torch.float32)
    model.eval()
    params = {k: v.clone() for k, v in model.named_parameters()}
    mitigate.recompute_bn_statistics(model, x, 8)  # batches 8, 8, 7
    assert not model.training and model[1].momentum == 0.1 and model[4].momentum == 0.3
    assert all(torch.equal(params[k], v) for k, v in model.named_parameters())
    ref = [torch.zeros(4), torch.zeros(4), torch.zeros(3), torch.zeros(3)]
    for s, e in ((0, 8), (8, 16), (16, 23)):
        h = model[0](x[s:e])
        ref[0] += h.mean(0) / 3
        ref[1] += h.var(0, unbiased=True) / 3
        h2 = model[3](torch.relu((h - h.mean(0)) / torch.sqrt(h.var(0, unbiased=False) + 1e-5) * model[1].weight + model[1].bias))
        ref[2] += h2.mean(0) / 3
        ref[3] += h2.var(0, unbiased=True) / 3
    torch.testing.assert_close(model[1].running_mean, ref[0].detach())
    torch.testing.assert_close(model[1].running_var, ref[1].detach())
    torch.testing.assert_close(model[4].running_mean, ref[2].detach())
    torch.testing.assert_close(model[4].running_var, ref[3].detach())
    # a trailing batch of one is folded into the previous batch (batches 8, 8, 9 of 25 samples)
    mitigate.recompute_bn_statistics(model, torch.randn(25, 5), 8)
    assert int(model[1].num_batches_tracked) == 3


def test_freeze_arm_uses_population_statistics(micro_root):
    """bn-frozen-pop: after the freeze the model's running statistics are population statistics of its
    training set at the freeze (not the momentum average), and they stay fixed (eval-mode BN)."""
    import bnmem.train as train
    from bnmem.runfolder import load_state_dict, read_npz
    root, cfg = micro_root
    cd = {**cfg.hashed_dict(), "data_dir": None, "exact_models": 0, "frozen_warmup_epochs": 1}
    sub = os.path.join(root, "popfreeze")
    os.makedirs(sub, exist_ok=True)
    os.symlink(os.path.join(root, "data.npz"), os.path.join(sub, "data.npz"))
    train.train_one(sub, cd, "bn-frozen-pop", 0)
    sd = load_state_dict(train.model_paths(sub, "bn-frozen-pop", 0)[0])
    bn_keys = [k for k in sd if k.endswith("num_batches_tracked")]
    # the recompute pass counts ceil(n / batch) batches; no batch-statistics step follows the freeze
    n = int(read_npz(os.path.join(root, "data.npz"))["keep"][0].sum())
    assert bn_keys and all(int(sd[k]) == math.ceil(n / cfg.batch_size) for k in bn_keys)


# -- the bootstrap's ROC statistics -----------------------------------------------------------------
def test_weighted_roc_metrics_matches_kernels():
    """The study's bootstrap statistics (score.weighted_roc_metrics, shared by bnmem run and mitigate):
    unit weights give bnmem_kernels.metrics' AUC / TPR (ties included); integer weights = repeated pairs."""
    from bnmem_kernels import metrics
    from bnmem.score import weighted_roc_metrics
    rng = np.random.default_rng(0)
    s = np.round(rng.normal(size=400), 1)  # many ties
    k = rng.random(400) < 0.4 + 0.2 * (s > 0)
    v = weighted_roc_metrics(s[None], k[None], np.ones((1, 1)), np.ones((1, 400)), fprs=(0.01, 0.1))
    assert v["auc"][0] == pytest.approx(metrics.roc_auc(torch.from_numpy(s), torch.from_numpy(k)), abs=1e-12)
    for f in (0.01, 0.1):
        assert v[f"tpr@{f:g}"][0] == pytest.approx(metrics.tpr_at_fpr(torch.from_numpy(s), torch.from_numpy(k), f),
                                                 abs=1e-12)
    w = rng.integers(0, 4, size=(3, 400)).astype(float)  # integer weights = repeated pairs
    v = weighted_roc_metrics(s[None], k[None], np.ones((3, 1)), w, fprs=(0.05,))
    for r in range(3):
        rep = np.repeat(np.arange(400), w[r].astype(int))
        ss, kk = torch.from_numpy(s[rep]), torch.from_numpy(k[rep])
        assert v["auc"][r] == pytest.approx(metrics.roc_auc(ss, kk), abs=1e-12)
        assert v["tpr@0.05"][r] == pytest.approx(metrics.tpr_at_fpr(ss, kk, 0.05), abs=1e-12)


def test_two_way_resamples_stratified():
    from bnmem.score import two_way_resamples
    group = np.array([0] * 10 + [1] * 3 + [3] * 2)
    cm, cc = two_way_resamples(group, 6, 50, seed=1)
    assert cm.shape == (50, 6) and (cm.sum(1) == 6).all()
    assert cc.shape == (50, 15) and (cc[:, :10].sum(1) == 10).all() and (cc[:, 10:13].sum(1) == 3).all()
    assert (cc[:, 13:].sum(1) == 2).all() and cm.std(0).max() > 0
    cm2, cc2 = two_way_resamples(group, 6, 50, seed=1)
    assert np.array_equal(cm, cm2) and np.array_equal(cc, cc2)


# -- DP-SGD arms --------------------------------------------------------------------------------------
def test_dp_names_init_and_per_sample_norms():
    """gn-dp<eps> is the gn model (same init under the same seed); Opacus' per-sample gradients (before
    clipping) have the per-sample norms of bnmem_kernels / autograd."""
    import bnmem_kernels
    from opacus import GradSampleModule

    from bnmem import dp
    assert dp.parse_epsilon("gn-dp8") == 8 and dp.parse_epsilon("gn-dp0.5") == 0.5 and dp.parse_epsilon("gn") is None
    assert dp.variant_name(4.0) == "gn-dp4" and dp.variant_name(0.5) == "gn-dp0.5"
    torch.manual_seed(3)
    a = build_model("cnn", "gn-dp8", (1, 8, 8), 10, 4)
    torch.manual_seed(3)
    b = build_model("cnn", "gn", (1, 8, 8), 10, 4)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    x, y = torch.randn(7, 1, 8, 8), torch.arange(7) % 10
    ref = bnmem_kernels.per_sample_grad_norms(b, gradnorms.per_sample_ce, x, y, mode="exact")
    gsm = GradSampleModule(a)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # full backward hook on a first layer without input gradients
        torch.nn.functional.cross_entropy(gsm(x), y).backward()  # mean reduction, as in training
    torch.testing.assert_close(dp._per_sample_norms(gsm).float(), ref.float(), rtol=1e-4, atol=1e-6)


def test_dp_train_one(micro_root):
    """A DP model: epsilon from Opacus' accountant at the target (within the accountant's tolerance),
    the trace fields the score stage reads, deterministic in (seed, m)."""
    import bnmem.train as train
    from bnmem import dp
    from bnmem.runfolder import load_state_dict, read_npz
    root, cfg = micro_root
    cd = {**cfg.hashed_dict(), "data_dir": None}
    outs = []
    for rep in ("dp-a", "dp-b"):
        sub = os.path.join(root, rep)
        os.makedirs(sub, exist_ok=True)
        os.symlink(os.path.join(root, "data.npz"), os.path.join(sub, "data.npz"))
        train.train_one(sub, cd, "gn-dp8", 1)  # dispatched to dp.train_one_dp
        outs.append((read_npz(train.model_paths(sub, "gn-dp8", 1)[1]), load_state_dict(train.model_paths(sub, "gn-dp8", 1)[0])))
    t, sd = outs[0]
    assert 7.5 < float(t["dp_epsilon"]) <= 8.0 + 1e-3 and float(t["dp_delta"]) == dp.DELTA
    assert float(t["dp_epsilon_rdp"]) >= float(t["dp_epsilon"]) - 1e-6  # RDP is the looser bound
    n = int(read_npz(os.path.join(root, "data.npz"))["keep"][1].sum())
    assert int(t["steps"]) == cfg.epochs * math.ceil(n / cfg.batch_size)
    assert float(t["dp_noise_multiplier"]) > 0.3 and t["epoch_norms"].shape[0] == cfg.epochs
    assert np.isfinite(t["epoch_norms"]).any() and 0 <= float(t["test_acc"]) <= 1
    assert all(torch.equal(sd[k], outs[1][1][k]) for k in sd)
    assert set(sd) == set(build_model("cnn", "gn", (1, 14, 14), 10, cfg.width).state_dict())


# -- the verdicts are computed from the statistics ------------------------------------------------------
def _fake_study(gn_leak_ci, gn_acc_ci):
    mk = lambda d, c: dict(diff=d, ci=list(c), direction=mitigate._direction(list(c)))
    st = {n: dict(test_acc=0.9, **{"tpr@0.01": 0.1, "auc": 0.6, "n_nonmembers": 9000}) for n in ("bn", "gn")}
    vs = {"gn": {"tpr@0.01": mk(sum(gn_leak_ci) / 2, gn_leak_ci), "test_acc": mk(sum(gn_acc_ci) / 2, gn_acc_ci),
                 "auc": mk(0, (-0.01, 0.01))}}
    ut = {"bn": "baseline", "gn": mitigate._utility(list(gn_acc_ci), 0.01)}
    return dict(rank_stat="tpr@0.01", arms_stats=st, vs_bn=vs, utility=ut, acc_tolerance=0.01,
                rank_matched={"bn": 2, "gn": 1}, rows=[dict(arm="bn"), dict(arm="gn")])


def test_answer_follows_the_numbers():
    yes = " ".join(mitigate.answer_markdown(_fake_study((-0.05, -0.01), (-0.005, 0.004))))
    assert "**gn** lowers membership leakage at matched utility" in yes
    costly = " ".join(mitigate.answer_markdown(_fake_study((-0.05, -0.01), (-0.08, -0.03))))
    assert "No arm in this run lowers" in costly and "not at matched accuracy: gn" in costly
    unresolved = " ".join(mitigate.answer_markdown(_fake_study((-0.05, 0.01), (-0.005, 0.004))))
    assert "Not resolved from bn" in unresolved and "resolves no leakage difference" in unresolved
    assert mitigate._utility([-0.02, 0.005], 0.01) == "not resolved" and mitigate._utility([0.02, 0.05], 0.01) == "higher"


def test_resolved_ranking_shares_ranks():
    rng = np.random.default_rng(0)
    boots = {"a": {"s": 0.10 + 0.001 * rng.normal(size=500)}, "b": {"s": 0.20 + 0.001 * rng.normal(size=500)}}
    boots["c"] = {"s": boots["a"]["s"] + 0.0001 * rng.normal(size=500)}  # not resolved from a
    r = mitigate._resolved_ranking(["a", "b", "c"], boots, "s")
    assert r == {"a": 1, "c": 1, "b": 3}


# -- the study end to end ---------------------------------------------------------------------------------
def test_mitigation_study_micro(tmp_path):
    """bn, gn and one DP arm end to end on the micro config: ranking table, CSV, plot, JSON, index, resume."""
    base = build_config(overrides={**MICRO, "variants": ["bn"], "epochs": 2, "bootstrap": 5, "exact_models": 1})
    arms = mitigate.default_arms(base, kinds=("bn", "gn", "dp"), epsilons=(8,))
    st = mitigate.run_study(base, arms, str(tmp_path), log=lambda *a: None, n_boot=200)
    rows = {r["arm"]: r for r in st["rows"]}
    assert set(rows) == {"bn", "gn", "gn-dp-eps8"}
    for r in rows.values():
        assert 0 <= r["test_acc"] <= 1 and 0 <= r["tpr@0.001"] <= r["tpr@0.01"] <= 1 and 0 <= r["auc"] <= 1
        lo, hi = r["auc_ci"]
        assert lo <= r["auc"] <= hi and r["test_acc_ci"][0] <= r["test_acc"] <= r["test_acc_ci"][1]
    assert rows["bn"]["auc_batchstats"] is not None and rows["gn"].get("auc_batchstats") is None
    assert st["pairing"] == {"bn": "identical", "gn": "identical", "gn-dp-eps8": "poisson (DP-SGD)"}
    assert 7.5 < rows["gn-dp-eps8"]["dp"]["epsilon"] <= 8.001
    assert st["rank_stat"] == "auc"  # 4 models x 72 candidates: too few non-members to rank on a TPR
    # the AUC point estimate is the score stage's (bnmem_kernels.metrics over the same scores)
    res = json.loads((tmp_path / "runs" / "base" / "results.json").read_text())
    assert rows["gn"]["auc"] == pytest.approx(res["variants"]["gn"]["modes"]["eval"]["attacks"][st["primary_attack"]]["overall"]["auc"])
    assert (tmp_path / "mitigation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = list(csv.DictReader((tmp_path / "mitigation.csv").open()))
    assert [r["arm"] for r in table] == ["bn", "gn", "gn-dp-eps8"]
    md = (tmp_path / "mitigation.md").read_text()
    assert md.splitlines()[2].startswith("**What should I do about BN's leakage?**")
    assert "## Ranking at matched utility" in md and "## DP-SGD privacy accounting" in md and "runs/base/report.md" in md
    saved = json.loads((tmp_path / "mitigation.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(st["rows"]))
    mt = (tmp_path / "runs" / "base" / "models" / "bn" / "m000.pt").stat().st_mtime_ns
    mitigate.run_study(base, arms, str(tmp_path), log=lambda *a: None, n_boot=200)  # resumes: nothing retrained
    assert (tmp_path / "runs" / "base" / "models" / "bn" / "m000.pt").stat().st_mtime_ns == mt


@pytest.mark.slow
def test_mitigation_cli_quick(tmp_path):
    """`bnmem mitigate --quick` with every arm (a few minutes on 2 cores)."""
    from suite_helpers import run_cli
    proc = run_cli("mitigate", "--quick", "--out", str(tmp_path / "m"), "--no-progress", timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader((tmp_path / "m" / "mitigation.csv").open()))
    assert len(rows) == 9
    assert "What should I do about BN's leakage?" in proc.stdout
