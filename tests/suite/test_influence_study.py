"""Issue 18 in the study: per-step influence on training batches, matched fit, bn-population."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bnmem import fit, influence_stats, step_influence, train
from bnmem.config import build_config
from bnmem.errors import BnmemError
from bnmem.models import build_model, freeze_batchnorm, set_population_stats
from bnmem.runfolder import read_npz, write_npz

from suite_helpers import MICRO


def _batch(B=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 1, 8, 8, generator=g), torch.randint(0, 10, (B,), generator=g)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [m.training for m in model.modules()]


def _per_sample_loop(model, x, y):
    """Exact per-sample gradients g_i (model as set: BN train mode couples), float64, by autograd."""
    m = __import__("copy").deepcopy(model).double()
    ps = [p for p in m.parameters()]
    losses = F.cross_entropy(m(x.double()), y, reduction="none")
    return torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(losses[i], ps, retain_graph=True)])
                        for i in range(len(y))])


@pytest.mark.parametrize("variant", ["bn", "gn", "bn-frozen"])
def test_centered_norms_and_amplification(variant):
    torch.manual_seed(1)
    model = build_model("cnn", variant, (1, 8, 8), 10, 4)
    if variant == "bn-frozen":
        model.train()
        model(torch.randn(32, 1, 8, 8))      # running statistics away from 0/1
        freeze_batchnorm(model)
    x, y = _batch()
    before, flags = _state(model)
    r = step_influence.measure(model, x, y)
    after, flags2 = _state(model)
    assert flags == flags2 and all(torch.equal(before[k], after[k]) for k in before)   # untouched
    G = _per_sample_loop(model, x, y)
    want = (G - G.mean(0)).norm(dim=1).numpy()
    np.testing.assert_allclose(r["centered"], want, rtol=2e-4)
    np.testing.assert_allclose(r["exact"], G.norm(dim=1).numpy(), rtol=2e-4)
    amp = r["infl"] / (r["centered"] / (len(y) - 1))
    if variant == "bn":       # batch coupling: the leave-one-out step is not the uncoupled one
        assert r["mode"] == "exact" and np.abs(amp - 1).max() > 1e-2
    else:                     # no coupling (GroupNorm; BN with fixed statistics): exactly 1
        assert r["mode"] == ("eval" if variant == "bn-frozen" else "exact")
        np.testing.assert_allclose(amp, 1.0, rtol=1e-3)


def test_population_stats_are_the_pools_and_decouple():
    torch.manual_seed(0)
    model = build_model("cnn", "bn-population", (1, 8, 8), 10, 4)
    pool = torch.randn(50, 1, 8, 8) * 2 + 1
    set_population_stats(model, pool)
    bn1 = model[1]
    h = model[0](pool)
    np.testing.assert_allclose(bn1.running_mean.numpy(), h.mean((0, 2, 3)).detach().numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(bn1.running_var.numpy(), h.var((0, 2, 3), correction=0).detach().numpy(), rtol=1e-4)
    assert not bn1.training and model.training   # BN layers fixed, the rest trains
    x = pool[:8]                                  # no coupling: a sample's output does not depend on its batch
    torch.testing.assert_close(model(x)[:3], model(x[:3]))
    # the second BN's statistics are of the pool as normalized by the first (pool statistics)
    with torch.no_grad():
        h2 = model[4](model[3](model[2](model[1](model[0](pool)))))
    np.testing.assert_allclose(model[5].running_mean.numpy(), h2.mean((0, 2, 3)).numpy(), rtol=1e-4, atol=1e-6)


def _micro_root(tmp_path, **kw):
    from bnmem import data
    cfg = build_config(overrides={**MICRO, **kw})
    arrays, _ = data.build(cfg)
    write_npz(str(tmp_path / "data.npz"), **arrays)
    return cfg, arrays


def test_train_records_influence_on_actual_batches(tmp_path):
    cfg, arrays = _micro_root(tmp_path, influence_points=4, fit_target=0.0, variants=["bn", "bn-population"])
    cd = {**cfg.hashed_dict(), "data_dir": None}
    for v in ("bn", "bn-population"):
        train.train_one(str(tmp_path), cd, v, 0)
        t = read_npz(train.model_paths(str(tmp_path), v, 0)[1])
        assert int(t["epochs_trained"]) == cfg.epochs and len(t["fit_history"]) == cfg.epochs
        P = t["infl_steps"].size
        assert P >= 4 and t["infl"].shape == (P, cfg.batch_size) == t["infl_idx"].shape
        ix = t["infl_idx"][t["infl_idx"] >= 0]
        assert arrays["keep"][0][ix].all()                     # training examples of this model only
        assert np.isfinite(t["infl"][t["infl_idx"] >= 0]).all() and (t["infl"][t["infl_idx"] >= 0] > 0).all()
        amp = t["infl"] / (t["infl_centered"] / ((t["infl_idx"] >= 0).sum(1, keepdims=True) - 1))
        ok = t["infl_idx"] >= 0
        if v == "bn-population":   # fixed statistics: no coupling
            assert list(t["infl_norm_modes"]) == ["eval"]
            np.testing.assert_allclose(amp[ok], 1.0, rtol=2e-3)
        else:
            assert np.abs(amp[ok] - 1).max() > 1e-3


def test_matched_fit_stops_and_extends(tmp_path):
    cfg, _ = _micro_root(tmp_path, influence_points=0, fit_target=0.05, fit_max_epochs=4, epochs=2)
    cd = {**cfg.hashed_dict(), "data_dir": None}
    train.train_one(str(tmp_path), cd, "gn", 0)
    t = read_npz(train.model_paths(str(tmp_path), "gn", 0)[1])
    assert int(t["epochs_trained"]) == 1 and t["fit_history"][0] >= 0.05    # met after the first epoch: stops
    cfg2, _ = _micro_root(tmp_path, influence_points=0, fit_target=1.0, fit_max_epochs=4, epochs=2)
    train.train_one(str(tmp_path), {**cfg2.hashed_dict(), "data_dir": None}, "gn", 1)
    t2 = read_npz(train.model_paths(str(tmp_path), "gn", 1)[1])
    assert int(t2["epochs_trained"]) == 4 or t2["fit_history"][-1] >= 1.0     # extended up to the cap
    assert t2["epoch_norms"].shape[0] == int(t2["epochs_trained"]) and len(t2["train_acc"]) == int(t2["epochs_trained"])


def test_fit_config_checked():
    with pytest.raises(BnmemError, match="fit-target"):
        build_config(overrides={**MICRO, "fit_target": 1.5})
    with pytest.raises(BnmemError, match="fit-max-epochs"):
        build_config(overrides={**MICRO, "fit_target": 0.9, "fit_max_epochs": 1, "epochs": 2})
    assert build_config(overrides={**MICRO, "fit_target": 0, "fit_max_epochs": 1}).fit_target == 0.0


def _fake_trace(infl_by_group, group_of, steps=30):
    P, B = 3, 4
    idx = np.tile(np.arange(B), (P, 1))
    infl = np.array([[infl_by_group[group_of[i]] for i in range(B)]] * P, float)
    return dict(infl=infl, infl_idx=idx, infl_centered=infl * (B - 1), infl_exact=2 * infl,
                infl_steps=np.array([0, 12, 25]), steps=np.int64(steps), infl_norm_modes=np.array(["exact"]),
                infl_kernel_seconds=np.float64(1.0), infl_extra_seconds=np.float64(0.5), seconds=np.float64(10.0))


def test_variant_stats_ratio_and_amplification():
    group = np.array([0, 0, 1, 3])
    traces = [_fake_trace({0: 1.0, 1: 3.0, 3: 5.0}, group), _fake_trace({0: 2.0, 1: 6.0, 3: 10.0}, group)]
    out, stats = influence_stats.variant_stats(traces, group, n_boot=20, seed=0)
    a = out["phases"]["all"]
    # OOD mean (3 + 5 + 6 + 10) / 4 = 6, in-dist mean (1 + 1 + 2 + 2) / 4 = 1.5
    assert a["ratio/ood"]["value"] == pytest.approx(4.0)
    assert a["norm_ratio/ood"]["value"] == pytest.approx(4.0)
    assert a["amp/ood"]["value"] == pytest.approx(1.0) and a["amp/in_dist"]["value"] == pytest.approx(1.0)
    assert set(out["phases"]) == {"all", "early", "middle", "late"}
    assert out["phases"]["early"]["ratio/ood"]["value"] == pytest.approx(4.0)
    assert out["samples"]["in_dist"] == 12 and out["kernel_seconds"] == 2.0   # (score.py moves it to timings)
    assert "infl/all/ratio/ood" in stats and len(stats["infl/all/ratio/ood"][1]) == 20


def test_fit_summary():
    traces = [dict(epochs_trained=np.int64(3), fit_history=np.array([0.5, 0.9, 0.99]), fit_target=np.float64(0.98),
                   train_acc=np.zeros(3)),
              dict(epochs_trained=np.int64(5), fit_history=np.array([0.5, 0.6, 0.7, 0.8, 0.9]),
                   fit_target=np.float64(0.98), train_acc=np.zeros(5))]
    mem = {"in_dist": dict(p_in=0.95, p_out=0.8), "ood": dict(p_in=0.7, p_out=0.1)}
    s = fit.summary(traces, mem, [0.85, 0.87])
    assert (s["epochs_min"], s["epochs_max"], s["met"]) == (3, 5, 1)
    assert s["train_test_gap"] == pytest.approx(0.95 - 0.86)


def test_recorder_spreads_points_over_a_longer_run():
    r = step_influence.Recorder(planned_steps=120, points=10, batch_size=4)
    for st in range(300):                      # the run went 2.5x its planned length (matched-fit extension)
        if r.due(st, 4):
            r.rows.append((st, 0, np.arange(4), {}))
            r._thin()
    steps = [x[0] for x in r.rows]
    assert 10 <= len(steps) < 20 and steps[0] == 0 and steps[-1] > 250
    assert len(set(np.diff(steps))) == 1        # evenly spaced
    short = step_influence.Recorder(planned_steps=120, points=10, batch_size=4)
    assert sum(short.due(st, 4) for st in range(80)) >= 10   # stopped after 2/3 of its schedule: still >= 10


def test_bn_compared_with_its_mechanism_arms():
    from bnmem.score import compare
    st = {v: {"eval/mem/ood": (x, [x] * 5)} for v, x in
          [("bn", 0.5), ("bn-frozen", 0.4), ("bn-population", 0.3), ("gn", 0.2)]}
    out = compare(st, ["bn", "bn-frozen", "bn-population", "gn"])
    assert {"bn - bn-frozen", "bn - bn-population", "bn - gn", "bn-frozen - bn-population",
            "bn-frozen - gn"} == set(out)
    assert out["bn - bn-frozen"]["eval/mem/ood"]["diff"] == pytest.approx(0.1)
