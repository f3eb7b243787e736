"""lira_scores / logit_confidence / rmia_scores vs the numpy/scipy loop oracle, on every backend."""
import functools
import re
import warnings

import numpy as np
import pytest
import torch

from bnmem_kernels import lira
from bnmem_kernels.ops import lira_scores as ops_ls
from bnmem_kernels.reference import lira as ref
from bnmem_kernels.testing import backend_params, device_backend_params

# the Triton interpreter evaluates masked lanes (log(0), inf - inf) through numpy, which warns
pytestmark = [pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:invalid value encountered in subtract:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:invalid value encountered in divide:RuntimeWarning")]

# online: per_example/global x mean/median; offline: x one_sided/logpdf
VARIANTS = [(True, v, c, "one_sided") for v in ("per_example", "global") for c in ("mean", "median")] + \
           [(False, v, c, s) for v in ("per_example", "global") for c in ("mean", "median")
            for s in ("one_sided", "logpdf")]
VID = [("on" if o else "off") + f"-{v}-{c}" + ("" if o else f"-{s}") for o, v, c, s in VARIANTS]
RTOL = {torch.float64: 1e-10, torch.float32: 1e-4}
# (M, N, A, balanced): M = 2.., A = 1, odd sizes
SHAPES = [(2, 5, 1, True), (3, 7, 2, False), (6, 9, 3, True), (7, 13, 1, False), (16, 33, 2, False)]
TRITON_SHAPES = [(5, 6, 2, False), (4, 3, 1, True)]


def make_data(M, N, A, balanced, seed=0, ties=False):
    g = torch.Generator().manual_seed(seed * 1000 + M * 100 + N * 10 + A)
    if balanced:  # every example in exactly half the models (floor)
        keep = torch.zeros(M, N, dtype=torch.bool)
        for n in range(N):
            keep[torch.randperm(M, generator=g)[: M // 2], n] = True
    else:
        keep = torch.rand(M, N, generator=g) < 0.3
    conf = torch.randn(M, N, A, generator=g, dtype=torch.float64) * 2 + 3 * keep[..., None]
    if ties:
        conf = conf.round()
    return conf, keep


@functools.lru_cache(maxsize=None)
def oracle(M, N, A, balanced, variant, dtype, ties=False):
    conf, keep = make_data(M, N, A, balanced, ties=ties)
    o, v, c, s = variant
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ref.lira_scores_loop(conf.to(dtype).double().numpy(), keep.numpy(), online=o, variance=v,
                                    center=c, offline_stat=s)


def norm_err(actual, expected):
    """max |a - e| / max |e| over the entries both define; NaN patterns must agree exactly."""
    a = actual.double().cpu().numpy()
    assert np.array_equal(np.isnan(a), np.isnan(expected)), "NaN pattern differs from the oracle"
    ok = ~np.isnan(expected)
    if not ok.any():
        return 0.0
    return float(np.abs(a[ok] - expected[ok]).max() / np.abs(expected[ok]).max())


def run(conf, keep, variant, backend):
    o, v, c, s = variant
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return lira.lira_scores(conf, keep, online=o, variance=v, center=c, offline_stat=s, backend=backend)


def check_shape(shape, variant, dtype, backend, ties=False, noncontig=False, device="cpu"):
    M, N, A, bal = shape
    conf, keep = make_data(M, N, A, bal, ties=ties)
    conf, keep = conf.to(device), keep.to(device)
    valid = ref.valid_mask(keep, variant[0], variant[1])
    if not valid.any():
        with pytest.raises(ValueError, match="no score can be formed"):
            run(conf.to(dtype), keep, variant, backend)
        return 0.0
    x = conf.to(dtype)
    if noncontig:
        x = x.transpose(0, 1).contiguous().transpose(0, 1)
        keep = keep.t().contiguous().t()
        assert not x.is_contiguous()
    got = run(x, keep, variant, backend)
    assert got.shape == (M, N) and got.dtype == dtype
    return norm_err(got, oracle(M, N, A, bal, variant, dtype, ties))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("variant", VARIANTS, ids=VID)
@pytest.mark.parametrize("backend", backend_params("cpu", ("cpu", "reference")))
def test_lira_vs_loop(backend, variant, dtype):
    errs = [check_shape(s, variant, dtype, backend) for s in SHAPES]
    if variant[1] == "global":  # ties (medians of duplicates); per-example stds of tied values can be 0
        errs.append(check_shape((9, 11, 2, False), variant, dtype, backend, ties=True))
    errs.append(check_shape((7, 13, 2, False), variant, dtype, backend, noncontig=True))
    assert max(errs) <= RTOL[dtype], errs


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("variant", VARIANTS, ids=VID)
@pytest.mark.parametrize("backend", backend_params("cpu", ("triton",)))
def test_lira_triton_vs_loop(backend, variant, dtype):
    errs = [check_shape(s, variant, dtype, backend) for s in TRITON_SHAPES]
    if dtype == torch.float64:
        errs.append(check_shape((5, 4, 2, False), variant, dtype, backend, ties=variant[1] == "global",
                                noncontig=True))
    assert max(errs) <= RTOL[dtype], errs


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("variant", VARIANTS, ids=VID)
@pytest.mark.parametrize("device,backend", [p for p in device_backend_params(("cuda", "triton"))
                                            if p.id.startswith("cuda")])
def test_lira_cuda_vs_loop(device, backend, variant, dtype):
    shapes = SHAPES + [(64, 257, 3, True), (100, 45, 2, False)]
    errs = [check_shape(s, variant, dtype, backend, device=device) for s in shapes]
    if variant[1] == "global":
        errs.append(check_shape((9, 11, 2, False), variant, dtype, backend, ties=True, device=device))
    errs.append(check_shape((7, 13, 2, False), variant, dtype, backend, noncontig=True, device=device))
    assert max(errs) <= RTOL[dtype], errs


@pytest.mark.parametrize("device,backend", [p for p in device_backend_params(("cuda", "triton"))
                                            if p.id.startswith("cuda")])
def test_logit_confidence_cuda(device, backend):
    g = torch.Generator().manual_seed(2)
    for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
        z = (torch.randn(37, 1000, generator=g, dtype=torch.float64) * 4).to(dtype)
        y = torch.randint(0, 1000, (37,), generator=g)
        want = lira.logit_confidence(z, y, backend="reference")
        got = lira.logit_confidence(z.to(device), y.to(device), backend=backend).cpu()
        tol = 1e-10 if dtype == torch.float64 else 1e-5
        assert ((got.double() - want.double()).abs() / want.double().abs().clamp_min(1.0)).max() <= tol
    z = torch.tensor([[1000.0, -1000.0, 0.0]] * 3, device=device)
    got = lira.logit_confidence(z, torch.tensor([0, 1, 2], device=device), backend=backend)
    assert got.tolist() == [1000.0, -2000.0, -1000.0]


@pytest.mark.parametrize("backend", backend_params("cpu", ("cpu", "triton", "reference")))
def test_offline_tails(backend):
    """log Phi far in both tails (z from about -1200 to +1200) and -log N far out, elementwise."""
    M, N = 6, 64
    keep = torch.zeros(M, N, dtype=torch.bool)
    keep[:3] = True
    g = torch.Generator().manual_seed(5)
    conf = torch.randn(M, N, 1, generator=g, dtype=torch.float64) * 0.05
    conf[:3] = torch.linspace(-60, 60, N, dtype=torch.float64)[None, :, None]
    for stat in ("one_sided", "logpdf"):
        got = lira.lira_scores(conf, keep, online=False, offline_stat=stat, backend=backend).numpy()
        want = ref.lira_scores_loop(conf.numpy(), keep.numpy(), online=False, offline_stat=stat)
        ok = ~np.isnan(want)
        assert np.array_equal(ok, ~np.isnan(got))
        rel = np.abs(got[ok] - want[ok]) / np.maximum(np.abs(want[ok]), 1e-300)
        assert rel.max() <= 1e-9, (stat, rel.max())


def _log_ndtr_exact(z: float) -> float:
    import mpmath  # torch depends on sympy, which depends on mpmath

    with mpmath.workdps(60):
        z = mpmath.mpf(z)
        return float(mpmath.log1p(-mpmath.ncdf(-z)) if z > 0 else mpmath.log(mpmath.ncdf(z)))


@pytest.mark.filterwarnings("ignore:divide by zero encountered in divide:RuntimeWarning")
@pytest.mark.parametrize("backend", backend_params("cpu", ("cpu", "triton", "reference")))
def test_log_phi_elementwise_vs_mpmath(backend):
    """offline one_sided is log Phi(z) itself where the out-models fitted are {-1, +1} (mu = 0,
    s = 1 exactly: of the out-models 1, 2, 3 the one at ref.drop_position(n, 3), which an in-target's
    fit drops, holds 0, the other two -1 and +1) and the target, model 0, holds z: elementwise vs 60-digit mpmath over z in [-40, 37]
    (each range of the kernels' case split, both sides of every threshold; above z = 37.5 log Phi
    is subnormal), beyond +-40 too, fp64. Bound: 5e-13 relative, the conditioning of erfc in its
    rounded argument z / sqrt 2 (2 z^2 ulp at z = 37; scipy's log_ndtr has the same)."""
    z = np.concatenate([np.linspace(-40, 37, 155), [-20.0, -20 - 1e-9, -19.99, -5.0, -3.0, -1e-3, -1e-300,
                                                    0.0, 1e-300, 1e-3, 3.0, 3.01, 5.9, 6.0, 6.1, 8.0]])
    conf = torch.zeros(4, z.size, 1, dtype=torch.float64)
    conf[0, :, 0] = torch.from_numpy(z)
    for n in range(z.size):
        vals = [-1.0, 1.0]
        vals.insert(ref.drop_position(n, 3), 0.0)  # 0: every sum exact
        conf[1:, n, 0] = torch.tensor(vals, dtype=torch.float64)
    keep = torch.zeros(4, z.size, dtype=torch.bool)
    keep[0] = True
    got = lira.lira_scores(conf, keep, online=False, offline_stat="one_sided", backend=backend)[0].numpy()
    want = np.array([_log_ndtr_exact(v) for v in z])
    rel = np.abs(got - want) / np.abs(want)
    assert rel.max() <= 5e-13, (z[rel.argmax()], rel.max())
    far = torch.tensor([-1e4, -600.0, 45.0, 1e4], dtype=torch.float64)
    conf2 = torch.cat([far.view(1, 4, 1), conf[1:, :4]])
    got = lira.lira_scores(conf2, keep[:, :4], online=False, backend=backend)[0].numpy()
    want = np.array([_log_ndtr_exact(v) for v in far.tolist()])
    assert np.abs(got[:2] - want[:2]).max() <= 1e-15 * np.abs(want[:2]).max()
    assert np.all(got[2:] <= 0) and np.all(got[2:] >= -1e-300)  # log Phi(45) = -1e-442 underflows


@pytest.mark.parametrize("backend", backend_params("cpu", ("cpu", "reference")))
def test_half_inputs_are_widened(backend):
    conf, keep = make_data(6, 9, 2, False)
    for dt in (torch.float16, torch.bfloat16):
        x = conf.to(dt)
        got = run(x, keep, VARIANTS[0], backend)
        want = run(x.float(), keep, VARIANTS[0], backend)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, equal_nan=True, rtol=0, atol=0)


def test_loo_median_by_index_arithmetic_matches_np_median():
    g = torch.Generator().manual_seed(3)
    for M in range(2, 12):
        x = torch.randint(0, 4, (M, 5, 1), generator=g).double()  # heavy ties
        grp = torch.rand(M, 5, 1, generator=g) < 0.6
        got = ref._loo_median(x, grp)
        for t in range(M):
            for n in range(5):
                vals = [x[m, n, 0].item() for m in range(M) if grp[m, n, 0] and m != t]
                if vals:
                    assert got[t, n, 0].item() == np.median(vals)


def test_too_few_models_warns_once_with_count():
    conf, keep = make_data(6, 10, 1, True)
    keep[:, 0] = True  # example 0: no out-model at all
    keep[:5, 1] = False  # example 1: one in-model (none without it as target)
    with pytest.warns(RuntimeWarning, match=r"of 60 scores \(in 2 example\(s\)\) are NaN") as rec:
        s = lira.lira_scores(conf, keep, backend="reference")
    assert len(rec) == 1
    assert s[:, 0].isnan().all() and s[:, 1].isnan().all() and not s[:, 2:].isnan().any()


@pytest.mark.parametrize("backend", backend_params("cpu", ("cpu", "reference")))
def test_m2_only_offline_global_can_score(backend):
    """M = 2 (one in-, one out-model per example): each group loses one model, so nothing can be
    fitted; M = 4 balanced: the global-variance estimators score every pair, per-example ones none."""
    conf, keep = make_data(2, 6, 2, True)
    for kw in ({}, {"variance": "global"}, {"online": False, "variance": "global"}):
        with pytest.raises(ValueError, match="no score can be formed"):
            lira.lira_scores(conf, keep, backend=backend, **kw)
    conf, keep = make_data(4, 6, 2, True)
    for online in (True, False):
        assert torch.isfinite(lira.lira_scores(conf, keep, online=online, variance="global", backend=backend)).all()
        with pytest.raises(ValueError, match="no score can be formed"):
            lira.lira_scores(conf, keep, online=online, backend=backend)


def test_fit_rule_drops_the_target_or_the_hashed_member():
    """The fit rule itself: per target and example, the in- and out-fits hold n_in - 1 and n_out - 1
    models; the target's own group drops the target, the other group its member at
    drop_position(n, size) (index order), which varies over the examples.
    Values 10^m (model m) make the fitted mean name the models used."""
    M, N = 6, 8
    keep = torch.rand(M, N, generator=torch.Generator().manual_seed(4)).argsort(0) < 3
    conf = (10.0 ** torch.arange(M, dtype=torch.float64))[:, None, None].expand(M, N, 1).contiguous()
    x = conf.double()
    for name, g in (("in", keep[..., None]), ("out", ~keep[..., None])):
        mu, _ = ref._fit_mean_std(x, g, ref.dropped_value(x, g))
        for t in range(M):
            for n in range(N):
                grp = [m for m in range(M) if bool(g[m, n, 0])]
                used = [m for m in grp if m != t] if t in grp else \
                    [m for i, m in enumerate(grp) if i != ref.drop_position(n, len(grp))]
                assert len(used) == 2
                assert mu[t, n, 0].item() == pytest.approx(sum(10.0 ** m for m in used) / 2, rel=1e-12)
    # the dropped member varies over the examples: every position of a 3-model group occurs
    # (the hash takes a few dozen examples to cover small groups: {0, 2} only over n < 8)
    assert len({ref.drop_position(n, 3) for n in range(64)}) == 3


def test_bad_inputs():
    conf, keep = make_data(4, 5, 2, True)
    with pytest.raises(TypeError, match="keep must be a bool"):
        lira.lira_scores(conf, keep.int())
    with pytest.raises(TypeError, match="conf must be a floating"):
        lira.lira_scores(conf.long(), keep)
    with pytest.raises(ValueError, match=r"keep must be \[M, N\]"):
        lira.lira_scores(conf, keep[:, :4])
    with pytest.raises(ValueError, match=r"\[M, N, A\]"):
        lira.lira_scores(conf[..., 0], keep)
    with pytest.raises(ValueError, match="M >= 2"):
        lira.lira_scores(conf[:1], keep[:1])
    for kw in ({"variance": "fixed"}, {"center": "mode"}, {"offline_stat": "two"}):
        with pytest.raises(ValueError, match=list(kw)[0]):
            lira.lira_scores(conf, keep, **kw)
    bad = conf.clone()
    bad[1, 2, 0] = float("nan")
    bad[3, 4, 1] = float("inf")
    with pytest.raises(ValueError, match=r"2 non-finite value\(s\).*\(1, 2, 0\), \(3, 4, 1\)"):
        lira.lira_scores(bad, keep)  # M = 4: no per-example score can be formed; NaN reported first
    conf6, keep6 = make_data(6, 5, 2, True)
    for backend in ("cpu", "reference"):
        for variance in ("per_example", "global"):
            for pos, val in (((1, 2, 0), float("nan")), ((5, 0, 1), -float("inf"))):
                bad = conf6.clone()
                bad[pos] = val
                with pytest.raises(ValueError, match=r"1 non-finite value\(s\) \(NaN/Inf\) of 60, first at indices "
                                                     + re.escape(str([pos]))):
                    lira.lira_scores(bad, keep6, variance=variance, backend=backend)
    with pytest.raises(ValueError, match="unknown backend"):
        lira.lira_scores(conf, keep, backend="gpu")


def test_higher_means_member():
    conf, keep = make_data(16, 40, 2, True)
    s = lira.lira_scores(conf, keep, backend="reference")
    assert s[keep].mean() > s[~keep].mean()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp64", "fp32", "bf16", "fp16"])
@pytest.mark.parametrize("backend", backend_params("cpu", ("cpu", "triton", "reference")))
def test_logit_confidence_vs_softmax(backend, dtype):
    g = torch.Generator().manual_seed(1)
    tol = {torch.float64: 1e-10}.get(dtype, 1e-5)
    for shape, K in (((3, 5), 11), ((1,), 2), ((), 7), ((4, 2, 3), 33)):
        z = (torch.randn(*shape, K, generator=g, dtype=torch.float64) * 4).to(dtype)
        y = torch.randint(0, K, shape, generator=g)
        p = torch.softmax(z.double(), -1).gather(-1, y[..., None]).squeeze(-1)
        want = torch.log(p / (1 - p))
        got = lira.logit_confidence(z, y, backend=backend)
        assert got.shape == y.shape and got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        err = ((got.double() - want).abs() / want.abs().clamp_min(1.0)).max().item()
        assert err <= tol, (shape, K, err)
    # non-contiguous logits
    z = torch.randn(6, 40, generator=g).to(dtype)[:, ::2]
    y = torch.randint(0, 20, (6,), generator=g)
    torch.testing.assert_close(lira.logit_confidence(z, y, backend=backend),
                               lira.logit_confidence(z.contiguous(), y, backend="reference"), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", backend_params("cpu", ("cpu", "triton", "reference")))
def test_logit_confidence_huge_logits(backend):
    z = torch.tensor([[1000.0, -1000.0, 0.0]] * 3 + [[-float("inf"), 3.0, -float("inf")]])
    y = torch.tensor([0, 1, 2, 1])
    got = lira.logit_confidence(z, y, backend=backend)
    assert got[:3].tolist() == [1000.0, -2000.0, -1000.0]
    assert got[3].item() == float("inf")


def test_logit_confidence_bad_inputs():
    z, y = torch.randn(4, 5), torch.randint(0, 5, (4,))
    with pytest.raises(TypeError, match="labels must be an integer"):
        lira.logit_confidence(z, y.float())
    with pytest.raises(ValueError, match="same leading shape"):
        lira.logit_confidence(z, y[:3])
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 5\)"):
        lira.logit_confidence(z, y + 5)
    with pytest.raises(ValueError, match="K >= 2"):
        lira.logit_confidence(z[:, :1], torch.zeros(4, dtype=torch.long))
    with pytest.raises(TypeError, match="logits must be a floating"):
        lira.logit_confidence(z.long(), y)


@pytest.mark.parametrize("offline", [True, False])
def test_rmia_vs_loop(offline):
    conf, keep = make_data(7, 23, 2, False)
    prob = torch.sigmoid(conf)
    g = torch.Generator().manual_seed(9)
    for gamma, a, P in ((1.0, 0.3, 11), (2.0, 0.5, 1), (0.5, 0.0, 40)):
        pop = torch.sigmoid(torch.randn(7, P, 3, generator=g, dtype=torch.float64) * 2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            got = lira.rmia_scores(prob, keep, pop, gamma=gamma, a=a, offline=offline)
        want = ref.rmia_scores_loop(prob.numpy(), keep.numpy(), pop.numpy(), gamma=gamma, a=a, offline=offline)
        assert norm_err(got, want) <= 1e-12
    assert got[keep].nanmean() > got[~keep].nanmean()


def test_rmia_bad_inputs():
    conf, keep = make_data(4, 5, 1, True)
    pop = torch.sigmoid(torch.randn(4, 3, 1))
    with pytest.raises(ValueError, match="probabilities in"):
        lira.rmia_scores(conf, keep, pop)
    with pytest.raises(TypeError, match="not a bool mask"):  # the old API: a mask over the candidates
        lira.rmia_scores(torch.sigmoid(conf), keep, torch.ones(5, dtype=torch.bool))
    with pytest.raises(TypeError, match="needs pop_prob"):
        lira.rmia_scores(torch.sigmoid(conf), keep, None)
    with pytest.raises(ValueError, match=r"pop_prob must be \[M, P, A\]"):
        lira.rmia_scores(torch.sigmoid(conf), keep, pop[:3])
    with pytest.raises(ValueError, match="pop_prob must hold probabilities"):
        lira.rmia_scores(torch.sigmoid(conf), keep, pop + 1)
    with pytest.raises(ValueError, match="gamma"):
        lira.rmia_scores(torch.sigmoid(conf), keep, pop, gamma=0.0)


def _opcheck_args():
    conf, keep = make_data(6, 7, 2, True)  # every score defined (opcheck compares without equal_nan)
    gstd = ref.global_std(conf, keep)
    return [(conf, keep, None, True, False, False), (conf.float(), keep, gstd.float(), True, True, False),
            (conf, keep, gstd, False, True, False), (conf, keep, None, False, False, True)]


@pytest.mark.parametrize("backend", backend_params("cpu", ("cpu",)))
def test_opcheck_compiled(backend):
    op = ops_ls.compiled_op()
    for args in _opcheck_args():
        torch.library.opcheck(op, args)
    from bnmem_kernels.ops import logit_confidence as lc

    torch.library.opcheck(lc.compiled_op(), (torch.randn(6, 5), torch.randint(0, 5, (6,))))
    conf, keep = make_data(6, 7, 2, True)
    torch.library.opcheck(ops_ls.compiled_global_std(), (conf, keep))
    torch.library.opcheck(ops_ls.compiled_global_std(), (conf.float(), keep))


@pytest.mark.parametrize("backend", backend_params("cpu", ("cpu",)))
def test_global_std_compiled_vs_numpy(backend):
    for M, N, A, bal in SHAPES:
        conf, keep = make_data(M, N, A, bal)
        got = ops_ls.compiled_global_std()(conf, keep)
        torch.testing.assert_close(got, ref.global_std(conf, keep), rtol=1e-12, atol=0, equal_nan=True)
        c, k = conf.numpy(), keep.numpy()
        for t in range(M):
            o = np.arange(M) != t
            for row, sel in ((0, k[o]), (1, ~k[o])):
                vals = c[o][sel]
                want = np.std(vals, axis=0) if len(vals) >= 2 else np.full(A, np.nan)
                np.testing.assert_allclose(got[row, t].numpy(), want, rtol=1e-12)


@pytest.mark.parametrize("backend", backend_params("cpu", ("triton",)))
def test_opcheck_triton(backend):
    args = _opcheck_args()[1]
    conf, keep = make_data(6, 3, 1, True)
    torch.library.opcheck(ops_ls.lira_scores_triton, (conf, keep, None, False, False, True))
    torch.library.opcheck(ops_ls.lira_scores_triton, args)
    from bnmem_kernels.ops import logit_confidence as lc

    torch.library.opcheck(lc.logit_confidence_triton, (torch.randn(3, 5), torch.randint(0, 5, (3,))))


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_zero_spread_warns_and_invalid_entries_are_nan(backend):
    """An example whose models' confidences all coincide has zero spread: its scores are not finite,
    with a RuntimeWarning counting them; scores lacking models are NaN (their own warning), and the
    two counts do not mix."""
    g = torch.Generator().manual_seed(3)
    M, N = 6, 4
    conf = torch.randn(M, N, 1, generator=g, dtype=torch.float64)
    conf[:, 0] = 0.5                                     # example 0: every model agrees
    keep = torch.zeros(M, N, dtype=torch.bool)
    keep[:3] = True                                      # 3 in, 3 out per example
    keep[:, 3] = torch.tensor([True, False, False, False, False, False])   # example 3: 1 in-model only
    with pytest.warns(RuntimeWarning) as rec:
        s = lira.lira_scores(conf, keep, online=True, backend=backend)
    msgs = [str(w.message) for w in rec]
    assert any(f"{M} score(s) are not finite" in m and "zero spread" in m for m in msgs), msgs
    assert any(f"{M} of {M * N} scores (in 1 example(s)) are NaN" in m for m in msgs), msgs
    assert not torch.isfinite(s[:, 0]).any() and s[:, 3].isnan().all()
    assert torch.isfinite(s[:, 1:3]).all()
