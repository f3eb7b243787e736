"""CIFAR-style ResNets with the normalization as a parameter; CIFAR-10 pickle loading and augmentations."""
import numpy as np
import pytest
import torch
import torch.nn as nn

from bnmem import cifar, data
from bnmem.config import VARIANTS, build_config
from bnmem.models import build_model, freeze_batchnorm, has_batchnorm
from bnmem.resnet import ARCHS

NORMS = list(VARIANTS) + ["gbn2"]


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("norm", NORMS)
def test_forward_backward_every_norm(arch, norm):
    torch.manual_seed(0)
    model = build_model(arch, norm, (3, 8, 8), 10, 2)
    x, y = torch.randn(5, 3, 8, 8), torch.tensor([0, 1, 2, 3, 4])
    out = model(x)
    assert out.shape == (5, 10) and torch.isfinite(out).all()
    nn.functional.cross_entropy(out, y).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert any(p.grad.abs().sum() > 0 for p in model.parameters())
    assert has_batchnorm(model) == (norm.startswith("bn") or norm.startswith("gbn"))
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all((c.bias is not None) == (norm == "none") for c in convs)
    model.eval()
    with torch.no_grad():
        assert model(x[:1]).shape == (1, 10)


def test_same_seed_same_init_across_norms():
    """Only the norm layers differ: every conv/linear weight is identical under the same seed."""
    def weights(norm):
        torch.manual_seed(3)
        m = build_model("resnet8", norm, (3, 8, 8), 10, 4)
        return [p.detach().clone() for mod in m.modules() if isinstance(mod, (nn.Conv2d, nn.Linear))
                for n, p in mod.named_parameters(recurse=False) if n == "weight"]
    ref = weights("bn")
    for norm in ("gn", "ln", "gbn4"):
        assert all(torch.equal(a, b) for a, b in zip(ref, weights(norm)))


def test_resnet18_shape_and_size():
    m = build_model("resnet18", "bn", (3, 32, 32), 10, 64)
    n = sum(p.numel() for p in m.parameters())
    assert 11.1e6 < n < 11.2e6  # the CIFAR ResNet-18 has ~11.17M parameters
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_bad_arch_and_norm():
    with pytest.raises(ValueError, match="unknown arch"):
        build_model("resnet99", "bn", (3, 8, 8), 10, 4)
    with pytest.raises(ValueError, match="unknown norm"):
        build_model("resnet8", "batchnorm", (3, 8, 8), 10, 4)


@pytest.mark.parametrize("norm", ["bn", "gn", "none"])
def test_per_sample_grad_norms_on_resnet(norm):
    """The suite's gradient-norm door works on the ResNet (fast path vs the autograd reference)."""
    from bnmem import gradnorms
    from bnmem_kernels import reference
    torch.manual_seed(1)
    model = build_model("resnet8", norm, (3, 8, 8), 10, 2).double()
    x, y = torch.randn(6, 3, 8, 8, dtype=torch.float64), torch.arange(6) % 10
    for mode in ("column", "exact"):
        got, _ = gradnorms.per_sample_grad_norms(model, x, y, mode)
        ref = reference.per_sample_grad_norms(model, gradnorms.per_sample_ce, x, y, mode=mode)
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=0)


# -- CIFAR-10 pickle batches -----------------------------------------------------------------------
def test_synthetic_cifar_batches_are_read_by_the_loader(tmp_path):
    folder = cifar.write_synthetic_cifar(tmp_path / "cifar-10-batches-py", n_per_batch=12, seed=1)
    x, y, k = data._load_cifar10(str(tmp_path))  # finds the cifar-10-batches-py subfolder
    assert x.shape == (72, 3, 32, 32) and x.dtype == np.float32 and k == 10
    assert 0 <= x.min() and x.max() <= 1 and y.shape == (72,) and set(y) <= set(range(10))
    import pickle
    with open(f"{folder}/data_batch_1", "rb") as f:
        b = pickle.load(f, encoding="bytes")
    np.testing.assert_array_equal(x[:12], b[b"data"].reshape(12, 3, 32, 32) / np.float32(255))
    for name in (tmp_path / "cifar-10-batches-py").iterdir():
        assert name.stat().st_size < 100_000


def test_cifar_config_builds_data(tmp_path):
    cifar.write_synthetic_cifar(tmp_path, n_per_batch=40, seed=2)
    cfg = build_config(overrides=dict(dataset="cifar10", data_dir=str(tmp_path), image_size=0, n_in=60, n_test=40,
                                      canaries={k: 2 for k in ("mislabeled", "other_domain", "noise", "near_ood")},
                                      models=4))
    arrays, meta = data.build(cfg)
    assert arrays["x"].shape[1:] == (3, 32, 32) and arrays["x_test"].shape == (40, 3, 32, 32)
    assert meta["shape"] == [3, 32, 32] and meta["group_counts"]["other_domain"] == 2


# -- augmentations ---------------------------------------------------------------------------------
def test_train_augment_is_a_flip_and_shift_of_each_image():
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).reshape(2, 3, 6, 6) + 1
    out = cifar.train_augment(x, torch.Generator().manual_seed(0), pad=2)
    assert out.shape == x.shape
    assert torch.equal(out, cifar.train_augment(x, torch.Generator().manual_seed(0), pad=2))
    for i in range(2):  # each output is one of the (flip, dy, dx) images
        cands = [cifar.apply_query_augmentation(x[i:i + 1], (f, dy, dx))[0]
                 for f in (False, True) for dy in range(-2, 3) for dx in range(-2, 3)]
        assert any(torch.equal(out[i], c) for c in cands)
    # over many draws, both flips and every offset occur
    big = x[:1].expand(400, -1, -1, -1)
    o = cifar.train_augment(big, torch.Generator().manual_seed(1), pad=1)
    assert len({tuple(t.flatten()[:40].tolist()) for t in o}) == 18  # 2 flips x 3 x 3 offsets
    assert torch.equal(cifar.train_augment(x, torch.Generator(), pad=0, flip=False), x)
    with pytest.raises(ValueError, match="x must be"):
        cifar.train_augment(x[0], torch.Generator())


def test_query_augmentations():
    augs = cifar.query_augmentations(2)
    assert augs[0] == (False, 0, 0) and len(augs) == 10 and len(set(augs)) == 10
    x = torch.randn(3, 3, 8, 8)
    assert torch.equal(cifar.apply_query_augmentation(x, augs[0]), x)
    assert torch.equal(cifar.apply_query_augmentation(x, (True, 0, 0)), x.flip(-1))
    assert cifar.query_augmentations(0, flip=False) == [(False, 0, 0)]


def test_device_helpers_cpu():
    d = cifar.resolve_device("cpu")
    assert d.type == "cpu" and cifar.amp_dtype(d) is None
    with cifar.autocast(d):
        assert torch.ones(2).dtype == torch.float32
    assert not cifar.grad_scaler(d).is_enabled()
    if not torch.cuda.is_available():
        assert cifar.resolve_device("auto").type == "cpu"
        with pytest.raises(ValueError, match="no CUDA GPU"):
            cifar.resolve_device("cuda")
    with pytest.raises(ValueError, match="device must be"):
        cifar.resolve_device("meta")


def test_frozen_resnet_bn_uses_running_stats():
    torch.manual_seed(0)
    m = build_model("resnet8", "bn-frozen", (3, 8, 8), 10, 2)
    m.train()
    freeze_batchnorm(m)
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        a = m(x)[:2]
        b = m(x[:2])
    torch.testing.assert_close(a, b)  # no batch statistics: a sample's output ignores the others


@pytest.mark.parametrize("augment", [False, True], ids=["plain", "augment"])
def test_resnet_trains_in_the_suite_on_cifar(tmp_path, augment):
    """`--arch resnet8 --dataset cifar10 [--augment]`: config accepted, data built from pickle batches, one
    shadow model trained (with crop + flip training augmentation when asked)."""
    from bnmem import train
    from bnmem.runfolder import RunFolder, load_state_dict, read_npz, write_npz
    cifar.write_synthetic_cifar(tmp_path / "c", n_per_batch=30, seed=3)
    cfg = build_config(overrides=dict(dataset="cifar10", data_dir=str(tmp_path / "c"), arch="resnet8", width=2,
                                      image_size=8, n_in=40, n_test=20,
                                      canaries={k: 2 for k in ("mislabeled", "other_domain", "noise", "near_ood")},
                                      models=4, epochs=1, variants=["bn"], exact_models=1, exact_points=1,
                                      probe_batch=4, batch_size=16, workers=1, progress=False, augment=augment))
    rf = RunFolder(tmp_path / "run")
    rf.open_for(cfg)
    arrays, _ = data.build(cfg)
    write_npz(rf.path("data.npz"), **arrays)
    r = train.train_one(rf.root, {**cfg.hashed_dict(), "data_dir": cfg.data_dir}, "bn", 0)
    assert train.is_done(rf.root, "bn", 0) and 0 <= r["test_acc"] <= 1
    m = build_model("resnet8", "bn", (3, 8, 8), 10, 2)
    m.load_state_dict(load_state_dict(train.model_paths(rf.root, "bn", 0)[0]))
    tr = read_npz(train.model_paths(rf.root, "bn", 0)[1])
    assert np.isfinite(tr["sched_norms"]).all() and tr["sched_norms"].shape[-1] == 4
