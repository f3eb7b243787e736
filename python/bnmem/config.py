"""The run configuration: defaults, `--quick` preset, TOML file, CLI flags (later ones win).

Every field that changes a number in the results is part of the config hash recorded in the run
folder's manifest; `workers` and `progress` only change how fast/noisy a run is, so they are not.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass, field

from .errors import BnmemError

DATASETS = ("mnist", "digits", "cifar10", "cifar100")
VARIANTS = ("bn", "gn", "ln", "none", "bn-frozen", "bn-population")
ARCHS = ("cnn", "mlp", "resnet8", "resnet18")  # resnet*: resnet.py (CIFAR-style)
CANARY_KINDS = ("mislabeled", "other_domain", "noise", "near_ood")
# attack name -> minimum number of shadow models it needs (leave-one-model-out leaves M-1 models,
# about half of them IN and half OUT for each example).
ATTACKS = {
    "lira_online": 8,          # per-example in/out means and std: >= 3 in and 3 out per example
    "lira_online_global": 4,
    "lira_offline": 8,
    "lira_offline_global": 4,
    "rmia": 4,
}
PRIMARY_ATTACK_ORDER = ("lira_online", "lira_online_global")
NOT_HASHED = ("workers", "progress", "data_dir")
MAX_LR = 10.0
INT_FIELDS = ("image_size", "n_in", "n_test", "width", "models", "epochs", "batch_size", "probe_every",
              "frozen_warmup_epochs", "exact_models", "exact_points", "probe_batch", "shifts", "bootstrap", "seed",
              "workers", "influence_points", "fit_max_epochs")


@dataclass
class Config:
    dataset: str = "mnist"
    data_dir: str | None = None          # cifar10/100 only: folder of the python batches (data.CIFAR_LAYOUT)
    image_size: int = 14                 # images resized (area) to this side; 0 keeps the native size
    n_in: int = 1000                     # in-distribution candidates
    n_test: int = 1000                   # held-out test examples (accuracy)
    canaries: dict = field(default_factory=lambda: {k: 40 for k in CANARY_KINDS})
    arch: str = "cnn"
    width: int = 12                      # channels of the first conv (second: 2x) / MLP hidden units / 4
    variants: list = field(default_factory=lambda: list(VARIANTS))
    models: int = 32                     # shadow models per variant (even; each candidate IN for half)
    epochs: int = 12
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    probe_every: int = 1                 # step probe (per-sample grad norms) every k steps; 0 = off
    frozen_warmup_epochs: int = 3        # bn-frozen: BN uses batch stats this long, then running stats
    exact_models: int = 2                # models per variant that also log exact/column/detached/eval
    exact_points: int = 5                # ... at this many steps of training (log-spaced)
    probe_batch: int = 64                # ... on a fixed batch of this many of its training examples
    influence_points: int = 10           # steps per model (spread over training, actual batches) with
                                         # loo_influence + exact norms of every sample (step_influence.py); 0 = off
    fit_target: float = 0.99             # matched fit (fit.py): train until eval-mode accuracy on the model's
                                         # in-distribution IN candidates >= this; 0 = off (equal epochs)
    fit_max_epochs: int = 30             # ... cap on the epochs per model (scheduled + extension)
    fit_extend_lr: float = 0.1           # ... extension epochs after the schedule run at lr * this (constant)
    augment: bool = False                # training augmentation: random crop (pad 4) + flip (cifar.train_augment)
    query_flips: bool = False            # query augmentations: flip x shifts (cifar.query_augmentations), as LiRA
    device: str = "cpu"                  # cpu | cuda | auto; cuda: autocast bf16 (fp16 + GradScaler without bf16)
    shifts: int = 1                      # query augmentations: identity and +-shifts px (A = 1 + 4 if >0)
    attacks: list = field(default_factory=lambda: ["auto"])
    bootstrap: int = 1000                # two-way (candidates x models) bootstrap resamples
    seed: int = 0
    workers: int = 0                     # 0 = all cores
    progress: bool = True

    # ------------------------------------------------------------------
    def validate(self) -> "Config":
        self._check_numbers()
        if self.dataset not in DATASETS:
            raise BnmemError(f"unknown dataset {self.dataset!r}; choose one of {', '.join(DATASETS)}")
        if self.dataset in ("cifar10", "cifar100"):
            if not self.data_dir:
                files = "data_batch_1..5, test_batch" if self.dataset == "cifar10" else "train, test"
                raise BnmemError(f"--dataset {self.dataset} needs --data-dir PATH: a local folder holding the python "
                                 f"pickle batches ({files}); bnmem never downloads")
            if not os.path.isdir(self.data_dir):
                raise BnmemError(f"--data-dir {self.data_dir!r} is not a folder; point it at the extracted "
                                 "cifar-10-batches-py folder")
        bad = [v for v in self.variants if v not in VARIANTS]
        if bad or not self.variants:
            raise BnmemError(f"unknown variant(s) {', '.join(bad) or '(none given)'}; choose from "
                             f"{', '.join(VARIANTS)}")
        if len(set(self.variants)) != len(self.variants):
            raise BnmemError("--variants lists a variant twice")
        if not (self.device in ("cpu", "cuda", "auto") or str(self.device).startswith("cuda:")):
            raise BnmemError(f"unknown --device {self.device!r}; choose cpu, cuda or auto")
        if str(self.device).startswith("cuda"):
            import torch
            if not torch.cuda.is_available():
                raise BnmemError(f"--device {self.device} but no CUDA GPU is visible; use --device cpu (or auto)")
        if self.arch not in ARCHS:
            raise BnmemError(f"unknown arch {self.arch!r}; choose one of {', '.join(ARCHS)}")
        unknown = set(self.canaries) - set(CANARY_KINDS)
        if unknown:
            raise BnmemError(f"unknown canary kind(s) {', '.join(sorted(unknown))}; kinds are "
                             f"{', '.join(CANARY_KINDS)}")
        for k, v in self.canaries.items():
            if not isinstance(v, int) or v < 0:
                raise BnmemError(f"canary count for {k} must be a non-negative integer, got {v!r}")
        self.canaries = {k: int(self.canaries.get(k, 0)) for k in CANARY_KINDS}
        if self.models < 4:
            raise BnmemError(f"--models {self.models} is too few: memorization and LiRA need at least 4 "
                             "shadow models per variant (each candidate IN for half, one left out as target); "
                             "use --models 4 or more (8+ for per-example-variance LiRA)")
        if self.models % 2:
            raise BnmemError(f"--models {self.models} must be even (each candidate is IN for exactly half)")
        for a in self.attacks:
            if a != "auto" and a not in ATTACKS:
                raise BnmemError(f"unknown attack {a!r}; choose from auto, {', '.join(ATTACKS)}")
            if a in ATTACKS and self.models < ATTACKS[a]:
                raise BnmemError(f"attack {a} needs at least {ATTACKS[a]} shadow models, got --models "
                                 f"{self.models}; raise --models or drop {a}")
        for name in ("n_in", "n_test", "epochs", "batch_size", "width", "probe_batch", "exact_points"):
            if getattr(self, name) < 1:
                raise BnmemError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.n_in < 20:
            raise BnmemError(f"--n-in {self.n_in} is too small; use at least 20 in-distribution candidates")
        if not 0 <= self.exact_models <= self.models:
            raise BnmemError(f"exact_models must be in [0, models], got {self.exact_models}")
        if self.image_size < 0 or self.image_size == 1:
            raise BnmemError(f"--image-size must be 0 (native) or >= 2, got {self.image_size}")
        if self.probe_every < 0:
            raise BnmemError("probe_every must be >= 0 (0 turns the per-step gradient-norm probe off)")
        if self.influence_points < 0:
            raise BnmemError("influence_points must be >= 0 (0 turns the per-step influence off)")
        if self.fit_target > 0 and self.fit_max_epochs < self.epochs:
            raise BnmemError(f"fit-max-epochs ({self.fit_max_epochs}) must be >= epochs ({self.epochs}) with matched "
                             "fit on (or --fit-target 0)")
        if self.bootstrap < 0:
            raise BnmemError("bootstrap must be >= 0")
        if self.shifts < 0:
            raise BnmemError("shifts must be >= 0")
        return self

    def _check_numbers(self) -> None:
        """Every number in range before any work: a bad value is a one-line error, not a traceback
        (or a silently replaced value) after the training."""
        for name in ("lr", "momentum", "weight_decay", "fit_target", "fit_extend_lr"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise BnmemError(f"{name.replace('_', '-')} must be a finite number, got {v!r}")
        if not 0 < self.lr <= MAX_LR:
            raise BnmemError(f"--lr must be in (0, {MAX_LR:g}], got {self.lr:g} (SGD with a larger step diverges "
                             "on these models; the default is 0.05)")
        if not 0 <= self.fit_target <= 1:
            raise BnmemError(f"fit-target must be in [0, 1] (0 = off: equal epochs), got {self.fit_target:g}")
        if not 0 < self.fit_extend_lr <= 1:
            raise BnmemError(f"fit-extend-lr must be in (0, 1] (a fraction of --lr), got {self.fit_extend_lr:g}")
        if not 0 <= self.momentum < 1:
            raise BnmemError(f"momentum must be in [0, 1), got {self.momentum:g}")
        if not 0 <= self.weight_decay <= 1:
            raise BnmemError(f"weight_decay must be in [0, 1], got {self.weight_decay:g}")
        for name in INT_FIELDS:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise BnmemError(f"{name.replace('_', '-')} must be an integer, got {v!r}")
        if not 0 <= self.seed < 2 ** 32:
            raise BnmemError(f"--seed must be in [0, 2^32), got {self.seed}")
        if self.workers < 0:
            raise BnmemError(f"--workers must be >= 0 (0 = all cores), got {self.workers}")
        if self.frozen_warmup_epochs < 0:
            raise BnmemError(f"frozen_warmup_epochs must be >= 0, got {self.frozen_warmup_epochs}")
        if not isinstance(self.variants, list) or not isinstance(self.attacks, list) \
                or not isinstance(self.canaries, dict):
            raise BnmemError("variants and attacks must be lists and canaries a table of counts")
        if self.data_dir is not None and not isinstance(self.data_dir, str):
            raise BnmemError(f"data_dir must be a path, got {self.data_dir!r}")

    def attack_list(self) -> list:
        if "auto" in self.attacks:
            return [a for a, need in ATTACKS.items() if self.models >= need]
        return list(self.attacks)

    def hashed_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for k in NOT_HASHED:
            d.pop(k)
        return d

    def hash(self) -> str:
        blob = json.dumps(self.hashed_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


QUICK = dict(n_in=200, n_test=200, canaries={k: 10 for k in CANARY_KINDS}, models=4, epochs=4,
             variants=["bn", "gn", "none"], exact_models=1, exact_points=2, probe_batch=16,
             width=8, bootstrap=1000, batch_size=32, fit_target=0.95, fit_max_epochs=6,
             influence_points=3)


def field_names():
    return [f.name for f in dataclasses.fields(Config)]


def load_toml(path: str) -> dict:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        try:
            import tomli as tomllib
        except ImportError:
            raise BnmemError("--config needs Python >= 3.11 (tomllib) or `pip install tomli`") from None
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise BnmemError(f"config file {path!r} not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise BnmemError(f"config file {path!r} is not valid TOML: {exc}") from None
    data = data.get("bnmem", data)  # allow a [bnmem] table or top-level keys
    unknown = set(data) - set(field_names())
    if unknown:
        raise BnmemError(f"config file {path!r}: unknown key(s) {', '.join(sorted(unknown))}; known keys: "
                         f"{', '.join(field_names())}")
    return data


def build_config(*, quick=False, toml_path=None, overrides=None) -> Config:
    """defaults <- quick preset <- TOML file <- CLI overrides (None values ignored)."""
    values = {}
    if quick:
        values.update(QUICK)
    if toml_path:
        values.update(load_toml(toml_path))
    for k, v in (overrides or {}).items():
        if v is not None:
            values[k] = v
    cfg = Config()
    defaults = dataclasses.asdict(cfg)
    for k, v in values.items():
        if k == "canaries" and isinstance(v, dict):
            merged = dict(defaults["canaries"])
            merged.update(v)
            v = merged
        expected = type(defaults[k]) if defaults[k] is not None else (str, type(None))
        if k in ("lr", "momentum", "weight_decay", "fit_target", "fit_extend_lr") and isinstance(v, int):
            v = float(v)
        if not isinstance(v, expected) or (expected is int and isinstance(v, bool)):
            raise BnmemError(f"config key {k!r} must be {getattr(expected, '__name__', 'a string')}, got {v!r}")
        setattr(cfg, k, v)
    return cfg.validate()


def from_dict(d: dict) -> Config:
    cfg = Config()
    for k, v in d.items():
        if k in field_names():
            setattr(cfg, k, v)
    return cfg
