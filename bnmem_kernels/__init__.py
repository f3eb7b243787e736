"""bnmem_kernels: per-sample gradient norms through BatchNorm, and batched LiRA scoring.

Importing this package is cheap: it never compiles, never loads the compiled library and never
touches a GPU. The compiled kernels load on first use (see `_backend`); `python -m
bnmem_kernels.info` reports what is available.
"""
from ._backend import BACKENDS, BackendUnavailableError, available_backends, select_backend
from .ops.ghost_norm_linear import ghost_norm_linear
from .ops.conv_weight_grad_sq import conv_weight_grad_sq
from .ops.norm_affine_grad_sq import norm_affine_grad_sq
from .ops.pooled_conv_weight_grad import pooled_conv_weight_grad
from .norms.onepass import per_sample_grad_norms
from .norms.probe import GradNormProbe
from .influence import loo_influence
from . import lira, metrics  # noqa: E402  (LiRA/RMIA scoring and ROC metrics; cheap to import)

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "GradNormProbe",
    "available_backends",
    "conv_weight_grad_sq",
    "ghost_norm_linear",
    "lira",
    "loo_influence",
    "metrics",
    "norm_affine_grad_sq",
    "per_sample_grad_norms",
    "pooled_conv_weight_grad",
    "select_backend",
]
