"""Test grid shared by every kernel test: devices x backends x dtypes, and per-dtype tolerances.

Tolerances are relative errors against an fp64 ground truth computed from the same (rounded)
inputs. They are statements of what each precision can deliver, not knobs: do not loosen them to
make a test pass.
"""
from __future__ import annotations

import torch

from . import _backend

DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)

# Relative tolerance of a reduction computed from inputs in that dtype (accumulating in fp32 for
# fp32/bf16/fp16, fp64 for fp64) against fp64 on the same values. Low-precision rows cover the
# rounding of intermediate values stored in that dtype (e.g. an activation gradient in bf16).
RTOL = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.bfloat16: 2e-2,
    torch.float16: 5e-3,
}


def devices() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _implemented(op_or_backends) -> tuple:
    """An op's name -> its backends from the dispatch registry; a tuple of backends -> itself."""
    if isinstance(op_or_backends, str):
        _backend.registered_ops()
        return _backend.backends_of(op_or_backends)
    return tuple(op_or_backends)


def backend_params(device: str = "cpu", implemented=_backend.BACKENDS):
    """pytest params for every backend of an op on `device`; unavailable ones skip with the reason.
    `implemented`: the op's name (its backends are read from the dispatch registry) or a tuple."""
    import pytest

    implemented = _implemented(implemented)
    params = []
    for b in implemented:
        why = _backend.unavailable_reason(b, device)
        params.append(pytest.param(b, id=b, marks=pytest.mark.skipif(bool(why), reason=why or "available")))
    return params


def device_backend_params(implemented=_backend.BACKENDS):
    """(device, backend) params over CPU and CUDA; CUDA ones skip cleanly without a GPU.
    `implemented`: the op's name (its backends are read from the dispatch registry) or a tuple."""
    import pytest

    implemented = _implemented(implemented)
    params = []
    for device in ("cpu", "cuda"):
        for b in implemented:
            if device == "cpu" and b == "cuda" or device == "cuda" and b == "cpu":
                continue
            why = "no CUDA GPU" if device == "cuda" and not torch.cuda.is_available() else \
                _backend.unavailable_reason(b, device)
            params.append(pytest.param(device, b, id=f"{device}-{b}",
                                       marks=pytest.mark.skipif(bool(why), reason=why or "available")))
    return params


def max_rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max_i |actual_i - expected_i| / max(|expected_i|, tiny), in fp64."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    if a.numel() == 0:
        return 0.0
    return ((a - e).abs() / e.abs().clamp_min(torch.finfo(torch.float64).tiny)).max().item()


# ------------------------------------------------------------------------------------------- zoo
# Models users bring, for the exact engine's selection tests and bench (bench/test_bench_exact_zoo.py):
# each entry builds (model, input shape without B, classes). Built on the CPU in fp32 under
# torch.manual_seed(seed); `.double()` them for fp64 checks. The suite's ResNets come from
# python/bnmem (imported when built).

def _zoo():
    import torch.nn as nn
    import torch.nn.functional as F

    class MaxPoolCNN(nn.Module):
        """The suite's MNIST CNN written as an nn.Module with plain attributes (no Sequential)."""

        def __init__(self, c=1, side=28, k=10, w=16):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(c, w, 3, padding=1), nn.BatchNorm2d(w)
            self.conv2, self.bn2 = nn.Conv2d(w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w)
            self.fc = nn.Linear(2 * w * (side // 4) ** 2, k)

        def forward(self, x):
            x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
            x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
            return self.fc(torch.flatten(x, 1))

    def strided_layers(c=3, w=32, k=10):
        return [nn.Conv2d(c, w, 3, stride=2, padding=1), nn.BatchNorm2d(w), nn.ReLU(),
                nn.Conv2d(w, w, 3, stride=2, padding=1), nn.BatchNorm2d(w), nn.ReLU(),
                nn.Conv2d(w, w, 3, stride=2, padding=1), nn.BatchNorm2d(w), nn.ReLU(),
                nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(w, k)]

    class StridedModule(nn.Module):
        """3 strided convs + BN + global average pool, as an nn.Module with a Sequential inside."""

        def __init__(self):
            super().__init__()
            layers = strided_layers()
            self.features = nn.Sequential(*layers[:-1])
            self.head = layers[-1]

        def forward(self, x):
            return self.head(self.features(x))

    class TVBasic(nn.Module):
        expansion = 1

        def __init__(self, cin, planes, stride=1):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(planes)
            self.relu = nn.ReLU(inplace=True)
            self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(planes)
            self.downsample = None
            if stride != 1 or cin != planes:
                self.downsample = nn.Sequential(nn.Conv2d(cin, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

        def forward(self, x):
            idt = x if self.downsample is None else self.downsample(x)
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            return self.relu(out + idt)

    class TVBottleneck(nn.Module):
        expansion = 4

        def __init__(self, cin, planes, stride=1):
            super().__init__()
            cout = planes * 4
            self.conv1, self.bn1 = nn.Conv2d(cin, planes, 1, bias=False), nn.BatchNorm2d(planes)
            self.conv2, self.bn2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False), nn.BatchNorm2d(planes)
            self.conv3, self.bn3 = nn.Conv2d(planes, cout, 1, bias=False), nn.BatchNorm2d(cout)
            self.relu = nn.ReLU(inplace=True)
            self.downsample = None
            if stride != 1 or cin != cout:
                self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            idt = x if self.downsample is None else self.downsample(x)
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.relu(self.bn2(self.conv2(out)))
            out = self.bn3(self.conv3(out))
            return self.relu(out + idt)

    class TVResNet(nn.Module):
        """torchvision's ResNet layout (7x7/2 stem, 3x3/2 max pool, four stages, avg pool, fc), narrow."""

        def __init__(self, block, layers, width=8, k=10):
            super().__init__()
            self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
            self.bn1 = nn.BatchNorm2d(width)
            self.relu = nn.ReLU(inplace=True)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
            c, stages = width, []
            for i, n in enumerate(layers):
                planes = width * 2 ** i
                blocks = []
                for j in range(n):
                    blocks.append(block(c, planes, 2 if (i > 0 and j == 0) else 1))
                    c = planes * block.expansion
                stages.append(nn.Sequential(*blocks))
            self.layer1, self.layer2, self.layer3, self.layer4 = stages
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(c, k)

        def forward(self, x):
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            return self.fc(torch.flatten(self.avgpool(x), 1))

    def mnist_cnn():
        from bnmem.models import small_cnn
        return small_cnn("bn", 1, 28, 10, 16), (1, 28, 28), 10

    def vgg_bn1d():
        m = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 10))
        return m, (3, 32, 32), 10

    def resnet(arch):
        from bnmem.resnet import build_resnet
        return build_resnet(arch, "bn", 3, 10, 16), (3, 32, 32), 10

    return {
        "mnist_cnn_seq": mnist_cnn,
        "maxpool_cnn_module": lambda: (MaxPoolCNN(), (1, 28, 28), 10),
        "strided_avgpool_seq": lambda: (nn.Sequential(*strided_layers()), (3, 32, 32), 10),
        "strided_avgpool_module": lambda: (StridedModule(), (3, 32, 32), 10),
        "vgg_bn1d": vgg_bn1d,
        "resnet8": lambda: resnet("resnet8"),
        "resnet18": lambda: resnet("resnet18"),
        "tv_basic": lambda: (TVResNet(TVBasic, [1, 1, 1, 1], width=8), (3, 64, 64), 10),
        "tv_bottleneck": lambda: (TVResNet(TVBottleneck, [1, 1, 1, 1], width=8), (3, 64, 64), 10),
        "bn_mlp": lambda: (nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 128), nn.BatchNorm1d(128), nn.ReLU(),
                                         nn.Linear(128, 128), nn.BatchNorm1d(128), nn.ReLU(), nn.Linear(128, 10)),
                           (3, 16, 16), 10),
    }


ZOO = ("mnist_cnn_seq", "maxpool_cnn_module", "strided_avgpool_seq", "strided_avgpool_module", "vgg_bn1d",
       "resnet8", "resnet18", "tv_basic", "tv_bottleneck", "bn_mlp")


def zoo_model(name: str, seed: int = 0):
    """(model [fp32, CPU, train mode], input shape without the batch, number of classes) of zoo entry `name`
    (ZOO): Sequential and nn.Module CNNs with max pools, strided convs + average pool, VGG with a
    BatchNorm1d head, the suite's ResNet-8 / ResNet-18 (width 16, 32x32), torchvision-style BasicBlock /
    Bottleneck ResNets (narrow, 64x64), a BatchNorm MLP."""
    builders = _zoo()
    if name not in builders:
        raise KeyError(f"unknown zoo model {name!r}; one of {ZOO}")
    torch.manual_seed(seed)
    return builders[name]()


def zoo_batch(shape, B: int, k: int, dtype=torch.float32, seed: int = 1):
    """Inputs [B, *shape] and class targets [B] for a zoo model, from a fixed generator."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, *shape, generator=g, dtype=dtype), torch.randint(0, k, (B,), generator=g)
