"""Plain-PyTorch definitions: the ground truth every fast implementation is tested against."""
from .bn_seeded_backward import bn_seeded_backward
from .conv_weight_grad_sq import conv_weight_grad_sq
from .ghost_norm import ghost_norm_linear
from .loo_influence import loo_influence
from .norm_affine import norm_affine_grad_sq
from .per_sample import per_sample_grad_norms
from .pooled_conv_weight_grad import pooled_conv_weight_grad

__all__ = ["bn_seeded_backward", "conv_weight_grad_sq", "ghost_norm_linear", "loo_influence", "norm_affine_grad_sq", "per_sample_grad_norms",
           "pooled_conv_weight_grad"]
