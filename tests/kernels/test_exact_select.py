"""mode="exact", path="auto": which engine runs (static rule on the first call, then the fastest by
timing), on the zoo of models users bring (bnmem_kernels.testing.ZOO); every route gives the autograd
loop's numbers (fp64, 1e-10)."""
import pytest
import torch
import torch.nn.functional as F

from bnmem_kernels.norms import exact as E
from bnmem_kernels.norms.exact import exact_report, reset_exact_selection
from bnmem_kernels.reference import per_sample_grad_norms as reference
from bnmem_kernels.testing import ZOO, zoo_batch, zoo_model

# seconds per call in fp64 at B = 3 on 2 cores: these run in the slow suite only
SLOW = {"resnet8", "resnet18", "tv_basic", "tv_bottleneck"}


def ce(o, t):
    return F.cross_entropy(o, t, reduction="none")


def rel(a, b):
    return ((a.double() - b.double()).abs() / b.double().abs()).max().item()


def zoo_params():
    return [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in ZOO]


def settle(m, x, y, max_calls=12):
    """Call auto until its choice is fixed; every call's result and report."""
    out = []
    for _ in range(max_calls):
        res, rep = exact_report(m, ce, x, y)
        out.append((res, rep))
        if rep["why"].startswith("timed:"):
            return out
    raise AssertionError(f"auto did not settle in {max_calls} calls: {[r['why'] for _, r in out]}")


@pytest.mark.parametrize("name", zoo_params())
def test_every_auto_call_gives_the_loops_numbers_on_the_zoo(name):
    """Exploring and settled calls alike (each a different engine): the loop's norms to 1e-10 in fp64."""
    m, shape, k = zoo_model(name)
    m = m.double()
    x, y = zoo_batch(shape, 3, k, torch.float64)
    exp = reference(m, ce, x, y, mode="exact")
    calls = settle(m, x, y)
    ran = set()
    for res, rep in calls:
        assert rel(res, exp) <= 1e-10, (rep["path"], rel(res, exp))
        ran.add(rep["path"])
    assert calls[0][1]["why"].startswith("static rule")
    assert len(ran) >= 2                      # at least one alternative was timed against the first


@pytest.mark.parametrize("name", [n for n in ZOO if n not in SLOW])
@pytest.mark.parametrize("path", ["chain", "coupled", "seed_batched", "loop"])
def test_every_engine_gives_the_loops_numbers_on_the_zoo(name, path):
    m, shape, k = zoo_model(name)
    m = m.double()
    x, y = zoo_batch(shape, 5, k, torch.float64)
    try:
        out, rep = exact_report(m, ce, x, y, path=path)
    except Exception as exc:        # the structured engines refuse what they do not model
        assert path in ("chain", "coupled"), exc
        return
    assert rep["path"] == path and rel(out, reference(m, ce, x, y, mode="exact")) <= 1e-10


class FakeClock:
    """time.perf_counter for exact.py: advanced by the test, by a fixed cost per engine run."""

    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


@pytest.mark.parametrize("fastest", ["chain", "seed_batched", "loop"])
def test_auto_settles_on_the_engine_timed_fastest(monkeypatch, fastest):
    costs = {"chain": 2.0, "seed_batched": 3.0, "loop": 4.0, "coupled": 9.0}
    costs[fastest] = 1.0
    clock = FakeClock()
    run = E._run

    def timed_run(path, *a, **kw):
        sq, rep = run(path, *a, **kw)
        clock.t += costs[rep["path"]]
        return sq, rep

    monkeypatch.setattr(E, "_run", timed_run)
    monkeypatch.setattr(E.time, "perf_counter", clock)
    monkeypatch.setenv("BNMEM_PASS_THREADS", "2")      # the loop and the threaded seed loop both candidates
    m, shape, k = zoo_model("bn_mlp")
    m = m.double()
    x, y = zoo_batch(shape, 4, k, torch.float64)
    exp = reference(m, ce, x, y, mode="exact")
    calls = settle(m, x, y)
    assert calls[0][1]["path"] == "chain"                # static rule: a chain
    final = calls[-1][1]
    assert final["path"] == fastest and final["why"].startswith("timed:") and fastest in final["why"]
    for _ in range(2):                                   # the choice stays
        out, rep = exact_report(m, ce, x, y)
        assert rep["path"] == fastest and rel(out, exp) <= 1e-10


def test_choice_is_per_model_batch_and_structure():
    m, shape, k = zoo_model("strided_avgpool_seq")
    m = m.double()
    x, y = zoo_batch(shape, 4, k, torch.float64)
    settle(m, x, y)
    assert exact_report(m, ce, x, y)[1]["why"].startswith("timed:")
    x6, y6 = zoo_batch(shape, 6, k, torch.float64)      # another batch size: a new problem
    assert exact_report(m, ce, x6, y6)[1]["why"].startswith("static rule")
    m2, _, _ = zoo_model("strided_avgpool_seq")          # another model object: its own timing
    assert exact_report(m2.double(), ce, x, y)[1]["why"].startswith("static rule")
    m.float()                                            # dtype changed: a new problem
    out, rep = exact_report(m, ce, x.float(), y)
    assert rep["why"].startswith("static rule")
    reset_exact_selection(m)
    assert exact_report(m, ce, x.float(), y)[1]["why"].startswith("static rule")


def test_a_hook_added_after_the_choice_is_respected():
    """The chain engine refuses hooks: once one is registered the problem is a new one (static rule,
    another engine), and the hook runs; the numbers stay the loop's."""
    m, shape, k = zoo_model("vgg_bn1d")
    m = m.double()
    x, y = zoo_batch(shape, 4, k, torch.float64)
    exp = reference(m, ce, x, y, mode="exact")
    settle(m, x, y)
    seen = []
    h = m[0].register_forward_hook(lambda *a: seen.append(1))
    try:
        out, rep = exact_report(m, ce, x, y)
    finally:
        h.remove()
    assert rep["path"] != "chain" and seen and rel(out, exp) <= 1e-10


def test_a_refusing_choice_falls_back_to_the_static_rule(monkeypatch):
    """A settled engine that refuses a call (here: forced by making chain_layers refuse) is dropped for that
    problem; the call runs the static rule and gives the loop's numbers."""
    from bnmem_kernels.norms import exact_chain

    m, shape, k = zoo_model("bn_mlp")
    m = m.double()
    x, y = zoo_batch(shape, 4, k, torch.float64)
    exp = reference(m, ce, x, y, mode="exact")
    from bnmem_kernels.norms.onepass import model_plan
    sel_key = E._selection_key(model_plan(m), (x,), y, None, None, False)
    settle(m, x, y)
    E._SELECTIONS[m][sel_key].choice = "chain"

    def refuse(model):
        raise exact_chain.ChainUnsupported("refused for the test")
    monkeypatch.setattr(exact_chain, "chain_layers", refuse)
    out, rep = exact_report(m, ce, x, y)
    assert rep["path"] != "chain" and rel(out, exp) <= 1e-10
    assert E._SELECTIONS[m][sel_key].dead["chain"] == "refused for the test"


def test_static_mode_never_explores(monkeypatch):
    monkeypatch.setenv("BNMEM_EXACT_AUTO", "static")
    m, shape, k = zoo_model("strided_avgpool_seq")
    x, y = zoo_batch(shape, 4, k)
    paths = {exact_report(m, ce, x, y)[1]["path"] for _ in range(4)}
    assert paths == {"chain"}
    monkeypatch.setenv("BNMEM_EXACT_AUTO", "fastest")
    with pytest.raises(ValueError, match="BNMEM_EXACT_AUTO"):
        exact_report(m, ce, x, y)


def test_static_selection_argument_never_explores(monkeypatch):
    """selection="static" (the suite's reproducible choice) overrides the environment's timed mode."""
    monkeypatch.setenv("BNMEM_EXACT_AUTO", "timed")
    m, shape, k = zoo_model("strided_avgpool_seq")
    x, y = zoo_batch(shape, 4, k)
    reps = [exact_report(m, ce, x, y, selection="static")[1] for _ in range(4)]
    assert {r["path"] for r in reps} == {"chain"} and all(r["why"].startswith("static rule") for r in reps)
    assert len({exact_report(m, ce, x, y)[1]["path"] for _ in range(4)}) > 1   # timed mode explores
    with pytest.raises(ValueError, match="selection"):
        exact_report(m, ce, x, y, selection="fastest")


def test_loop_path_is_the_autograd_loop():
    m, shape, k = zoo_model("maxpool_cnn_module")
    m = m.double()
    x, y = zoo_batch(shape, 4, k, torch.float64)
    (out, pl), rep = exact_report(m, ce, x, y, path="loop", per_layer=True)
    exp, exp_pl = reference(m, ce, x, y, mode="exact", per_layer=True)
    assert rep["path"] == "loop" and rel(out, exp) <= 1e-10
    for n, v in exp_pl.items():
        assert rel(pl[n], v) <= 1e-10, n


# ------------------------------------------------------------- structure from any module graph (fx)
class Counting(torch.nn.Module):
    """A forward that changes between calls (a Python counter): a trace of one call is not the next."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.fc = torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2), torch.nn.Linear(8, 2)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        h = F.relu(self.bn(self.conv(x)))
        if self.calls % 2:
            h = torch.tanh(h)
        return self.fc(torch.flatten(F.max_pool2d(h, 2), 1))


class EvalBranch(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.bn, self.out = torch.nn.Linear(4, 5), torch.nn.BatchNorm1d(5), torch.nn.Linear(5, 3)

    def forward(self, x):
        h = self.bn(self.lin(x))
        if self.training:
            h = torch.tanh(h)
        return self.out(h)


@pytest.mark.parametrize("module_name,seq_name", [("maxpool_cnn_module", "mnist_cnn_seq"),
                                                  ("strided_avgpool_module", "strided_avgpool_seq")])
def test_module_and_sequential_versions_get_the_same_engine(module_name, seq_name):
    """The same network as an nn.Module (plain attributes and functional ops, or a Sequential inside) takes
    the chain engine as the Sequential does (read off a torch.fx trace), with the loop's numbers."""
    reps = []
    for name in (module_name, seq_name):
        m, shape, k = zoo_model(name)
        m = m.double()
        x, y = zoo_batch(shape, 5, k, torch.float64)
        out, rep = exact_report(m, ce, x, y)
        assert rel(out, reference(m, ce, x, y, mode="exact")) <= 1e-10
        reps.append(rep)
    assert reps[0]["path"] == reps[1]["path"] == "chain"
    assert reps[0]["layers"] == reps[1]["layers"] and reps[0].get("traced") and not reps[1].get("traced")


def test_traced_chain_that_does_not_reproduce_the_forward_is_refused():
    torch.manual_seed(0)
    m = Counting().double()
    x, y = zoo_batch((1, 6, 6), 4, 2, torch.float64)
    from bnmem_kernels.norms.exact_chain import ChainUnsupported
    with pytest.raises(ChainUnsupported, match="does not reproduce model"):
        exact_report(m, ce, x, y, path="chain")
    out, rep = exact_report(Counting().double(), ce, x, y)   # auto: another engine, the reason reported
    assert rep["path"] != "chain" and "does not reproduce model" in rep["chain"]


def test_trace_is_taken_in_train_mode():
    """A forward branching on self.training, called on a model in eval mode: exact mode runs it in train
    mode (batch statistics), and so does the traced chain."""
    torch.manual_seed(0)
    m = EvalBranch().double().eval()
    x, y = zoo_batch((4,), 6, 3, torch.float64)
    out, rep = exact_report(m, ce, x, y, path="chain")
    assert rep["path"] == "chain" and rep["traced"] and not m.training
    assert rel(out, reference(m, ce, x, y, mode="exact")) <= 1e-10


@pytest.mark.parametrize("name", ["resnet8", "tv_basic"])
def test_residual_nets_are_not_read_as_chains(name):
    m, shape, k = zoo_model(name)
    from bnmem_kernels.norms.exact_chain import ChainUnsupported, chain_layers
    with pytest.raises(ChainUnsupported, match="branch or merge"):
        chain_layers(m)


def test_chain_memory_check_shrinks_its_chunk_then_drops_it(monkeypatch):
    """Where the chain engine's buffers exceed CHAIN_ARENA_RATIO x the activations, auto reruns it with
    fewer seeds per chunk, and drops it at one seed; every call gives the loop's numbers."""
    monkeypatch.setattr(E, "CHAIN_ARENA_RATIO", 0.0)
    m, shape, k = zoo_model("strided_avgpool_seq")
    m = m.double()
    x, y = zoo_batch(shape, 8, k, torch.float64)
    exp = reference(m, ce, x, y, mode="exact")
    calls = settle(m, x, y)
    chain_chunks = [rep["chunk"] for _, rep in calls if rep["path"] == "chain"]
    assert chain_chunks == [4, 1]            # the default (half the batch), then one seed per chunk
    assert calls[-1][1]["path"] != "chain" and "memory" in calls[-1][1]["why"]
    for out, rep in calls:
        assert rel(out, exp) <= 1e-10, rep["path"]
