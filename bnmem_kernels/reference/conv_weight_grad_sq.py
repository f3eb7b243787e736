"""Reference per-sample squared norms of a Conv2d weight gradient (docs/math.md, "Ghost norms")."""
import torch
import torch.nn.functional as F

from .ghost_norm import accumulation_dtype


def conv_weight_grad_sq(x: torch.Tensor, grad_out: torch.Tensor, kernel_size, stride, dilation,
                        groups: int) -> torch.Tensor:
    """||dW_i||_F^2 per sample for x [B, C_in, Hp, Wp] (already padded), grad_out [B, C_out, OH, OW]:
    dW_i[co, ci, kh, kw] = sum_{oh, ow} g[i, co, oh, ow] x[i, g_ci, oh sh + kh dh, ow sw + kw dw].

    The input unfolded (im2col) into [B, groups, C_in/g kh kw, L], the weight gradient per sample and
    group as one einsum, squared and summed. fp64 for fp64 inputs, fp32 otherwise.
    """
    acc = accumulation_dtype(x.dtype)
    x, g = x.to(acc), grad_out.to(acc)
    B, C, Co = x.shape[0], x.shape[1], g.shape[1]
    cols = F.unfold(x, tuple(kernel_size), dilation=tuple(dilation), stride=tuple(stride))   # [B, C K, L]
    cols = cols.reshape(B, groups, cols.shape[1] // groups, cols.shape[2])
    g = g.reshape(B, groups, Co // groups, cols.shape[3])                                     # [B, groups, C_out/g, L]
    dw = torch.einsum("bgol,bgkl->bgok", g, cols)
    return dw.square().sum(dim=(1, 2, 3))
