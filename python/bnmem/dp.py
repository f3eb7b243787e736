"""DP-SGD arms of the mitigation study: GroupNorm models trained with Opacus (per-sample clipping +
Gaussian noise, Poisson sampling), at a target epsilon.

Variant name "gn-dp<eps>" (e.g. "gn-dp8"): the suite's GroupNorm model (`models.norm_layer`: the same
architecture and, under the same seed, the same initial weights as the "gn" variant), the same keep
mask, trained for the same number of steps as the gn variant (epochs x ceil(n / batch)), with
Opacus' `PrivacyEngine.make_private_with_epsilon`:
  * sampling: Poisson, sample rate q = 1 / ceil(n / batch size) (expected batch = the batch size).
    Poisson sampling is what the accountant's guarantee assumes, so these arms do NOT share the
    other arms' batch order (they share data, keep masks and initialization);
  * per-sample clipping to MAX_GRAD_NORM, Gaussian noise with the noise multiplier Opacus' accountant
    (ACCOUNTANT, "prv", Opacus' default) computes for (eps, DELTA, q, steps) -- exactly what
    make_private_with_epsilon does, with the multiplier cached (it costs seconds per call);
  * SGD with momentum and weight decay of the config, OneCycle schedule to LR (DP-SGD's clipped,
    noised gradient wants a larger step than the 0.05 of the non-private runs: 0.05 / 0.5 / 2.0
    were tried on one model at eps = 8 and 0.5 gave the best test accuracy; no other tuning).
BatchNorm cannot be trained this way (its per-sample gradients are not separable: Opacus refuses it).
The epsilon spent is read back from the accountant after training (and, as a cross-check, from an
RDP accountant over the same history) and written to the model's trace with delta, sigma, q and steps.
Per-sample gradient norms over training (the trace's epoch_norms) are the norms of Opacus' per-sample
gradients BEFORE clipping, as the other arms' step probe records them (norm of grad l_i).
"""
from __future__ import annotations

import functools
import os
import re
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F

DELTA = 1e-5            # well below 1 / n (n ~ 600 training examples per model in the default study)
MAX_GRAD_NORM = 1.0     # per-sample clipping bound C
LR = 0.5                # OneCycle peak learning rate of the DP arms
ACCOUNTANT = "prv"      # Opacus' default accountant (noise multiplier and the epsilon reported)
_NAME = re.compile(r"^gn-dp(\d+(?:\.\d+)?)$")


def parse_epsilon(variant: str) -> float | None:
    """"gn-dp8" -> 8.0, "gn-dp0.5" -> 0.5; other names -> None. Raises ValueError for eps <= 0."""
    m = _NAME.match(variant)
    if not m:
        return None
    eps = float(m.group(1))
    if not eps > 0:
        raise ValueError(f"DP variant {variant!r}: the target epsilon must be > 0")
    return eps


def variant_name(eps: float) -> str:
    return f"gn-dp{eps:g}"


@functools.lru_cache(maxsize=64)
def noise_multiplier(eps: float, delta: float, sample_rate: float, epochs: int) -> float:
    """Opacus' accountant: the noise multiplier reaching (eps, delta) after epochs / sample_rate steps
    (what make_private_with_epsilon computes; cached per process: every model of an arm shares it)."""
    from opacus.accountants.utils import get_noise_multiplier
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(get_noise_multiplier(target_epsilon=eps, target_delta=delta, sample_rate=sample_rate,
                                          epochs=epochs, accountant=ACCOUNTANT))


@functools.lru_cache(maxsize=64)
def spent_epsilon(sigma: float, sample_rate: float, steps: int, delta: float) -> tuple:
    """(epsilon of ACCOUNTANT, epsilon of an RDP accountant) after `steps` steps of the Gaussian
    mechanism with noise multiplier sigma and Poisson rate sample_rate (cached: the models of an arm share it)."""
    from opacus.accountants import RDPAccountant, create_accountant
    out = []
    for acc in (create_accountant(mechanism=ACCOUNTANT), RDPAccountant()):
        acc.history = [(sigma, sample_rate, steps)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "optimal order is the largest alpha": RDP's bound is looser there
            out.append(float(acc.get_epsilon(delta)))
    return tuple(out)


def _per_sample_norms(module) -> torch.Tensor:
    """L2 norm over all parameters of each sample's gradient (Opacus' grad_sample, before clipping)."""
    sq = None
    for p in module.parameters():
        gs = getattr(p, "grad_sample", None)
        if gs is None:
            continue
        s = gs.reshape(gs.shape[0], -1).double().square().sum(1)
        sq = s if sq is None else sq + s
    return sq.sqrt()


def train_one_dp(root: str, cfg_dict: dict, variant: str, m: int) -> dict:
    """Train model m of a "gn-dp<eps>" variant; writes the same trace/checkpoint files as train.train_one,
    plus dp_* fields. Deterministic in (seed, m): seeded sampler and noise generators."""
    from opacus import PrivacyEngine

    from .cifar import train_augment
    from .config import from_dict
    from .models import build_model
    from .runfolder import read_npz, save_state_dict, write_npz
    from .train import model_paths, order_digest, seeds_for

    torch.set_num_threads(1)
    eps = parse_epsilon(variant)
    if eps is None:
        raise ValueError(f"not a DP variant: {variant!r}")
    cfg = from_dict(cfg_dict)
    if str(cfg.device) != "cpu":
        raise ValueError("the DP-SGD arms run on the CPU only (device = cpu)")
    t0 = time.perf_counter()
    d = read_npz(os.path.join(root, "data.npz"))
    x_all, y_all = torch.from_numpy(d["x"]), torch.from_numpy(d["y"])
    train_idx = np.flatnonzero(d["keep"][m])
    N = len(y_all)
    n_classes = int(max(y_all.max().item(), d["y_test"].max()) + 1)
    torch_seed, order_seed = seeds_for(cfg, m)
    torch.manual_seed(torch_seed)
    model = build_model(cfg.arch, variant, x_all.shape[1:], n_classes, cfg.width)  # = the gn variant's init
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    idx_t = torch.from_numpy(train_idx)
    ds = torch.utils.data.TensorDataset(x_all[idx_t], y_all[idx_t], idx_t)
    loader = torch.utils.data.DataLoader(ds, batch_size=cfg.batch_size,
                                         generator=torch.Generator().manual_seed(order_seed))
    steps_per_epoch = len(loader)  # ceil(n / batch): the gn variant's steps per epoch
    sigma = noise_multiplier(eps, DELTA, 1.0 / steps_per_epoch, cfg.epochs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "secure_mode" advice: seeded generators are wanted here
        engine = PrivacyEngine(accountant=ACCOUNTANT)
        # = make_private_with_epsilon(target_epsilon=eps, target_delta=DELTA, epochs=cfg.epochs), sigma cached
        gsm, dp_opt, dp_loader = engine.make_private(
            module=model, optimizer=opt, data_loader=loader, noise_multiplier=sigma,
            max_grad_norm=MAX_GRAD_NORM, poisson_sampling=True,
            noise_generator=torch.Generator().manual_seed(order_seed + 1))
    total = steps_per_epoch * cfg.epochs
    sched = torch.optim.lr_scheduler.OneCycleLR(dp_opt, max_lr=LR, total_steps=total, pct_start=0.15)
    aug_gen = torch.Generator().manual_seed(order_seed) if cfg.augment else None
    epoch_norms = np.full((cfg.epochs, N), np.nan, np.float32)
    loss_hist, acc_hist = np.zeros(cfg.epochs, np.float32), np.zeros(cfg.epochs, np.float32)
    digests, step = [], 0
    for epoch in range(cfg.epochs):
        gsm.train()
        tot_loss = tot_correct = seen = 0.0
        seq = []
        for xb, yb, ib in dp_loader:  # one "epoch" = steps_per_epoch Poisson batches
            if len(yb) == 0:  # an empty Poisson batch: Opacus still steps (noise only)
                dp_opt.zero_grad(set_to_none=True)
                dp_opt.step()
                sched.step()
                step += 1
                continue
            if aug_gen is not None:
                xb = train_augment(xb, aug_gen)
            dp_opt.zero_grad(set_to_none=True)
            out = gsm(xb)
            losses = F.cross_entropy(out, yb, reduction="none")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Opacus' full backward hooks on a first layer without input grads
                losses.mean().backward()
            epoch_norms[epoch, ib.numpy()] = _per_sample_norms(gsm).float().numpy()
            dp_opt.step()
            sched.step()
            step += 1
            seq.append(ib.numpy())
            tot_loss += losses.sum().item()
            tot_correct += (out.argmax(1) == yb).sum().item()
            seen += len(yb)
        digests.append(order_digest(np.concatenate(seq) if seq else np.zeros(0, np.int64)))
        loss_hist[epoch] = tot_loss / max(seen, 1)
        acc_hist[epoch] = tot_correct / max(seen, 1)
    hist = engine.accountant.history  # [(sigma, q, steps)]: one entry, as every step had the same sigma and q
    if len(hist) != 1:
        raise RuntimeError(f"unexpected privacy accountant history {hist}")
    eps_spent, eps_rdp = spent_epsilon(*hist[0], DELTA)
    net = gsm._module
    net.eval()
    with torch.no_grad():
        test_acc = (net(torch.from_numpy(d["x_test"])).argmax(1).numpy() == d["y_test"]).mean()
    pt, npz = model_paths(root, variant, m)
    write_npz(npz, epoch_norms=epoch_norms, train_loss=loss_hist, train_acc=acc_hist,
              test_acc=np.float32(test_acc), sched_steps=np.zeros(0, np.int64), probe_idx=np.zeros(0, np.int64),
              sched_norms=np.zeros((0, 4, 0), np.float32), sched_sources=np.zeros(0, dtype="U64"),
              step_probe_source=np.array("opacus grad_sample (before clipping)"), steps=np.int64(step),
              order_digest=np.array(digests), seconds=np.float64(time.perf_counter() - t0),
              dp_target_epsilon=np.float64(eps), dp_epsilon=np.float64(eps_spent), dp_epsilon_rdp=np.float64(eps_rdp),
              dp_delta=np.float64(DELTA), dp_noise_multiplier=np.float64(dp_opt.noise_multiplier),
              dp_sample_rate=np.float64(1.0 / steps_per_epoch), dp_max_grad_norm=np.float64(MAX_GRAD_NORM),
              dp_lr=np.float64(LR), dp_accountant=np.array(ACCOUNTANT))
    save_state_dict(pt, {k: v.detach().cpu() for k, v in net.state_dict().items()})
    return dict(variant=variant, m=m, test_acc=float(test_acc), train_acc=float(acc_hist[-1]),
                seconds=time.perf_counter() - t0)
