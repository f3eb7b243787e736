"""Plain-PyTorch definitions: the ground truth every fast implementation is tested against."""
from .ghost_norm import ghost_norm_linear
from .per_sample import per_sample_grad_norms

__all__ = ["ghost_norm_linear", "per_sample_grad_norms"]
