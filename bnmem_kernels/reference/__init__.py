"""Plain-PyTorch definitions: the ground truth every fast implementation is tested against."""
from .ghost_norm import ghost_norm_linear

__all__ = ["ghost_norm_linear"]
