"""Reference weight gradient of a Conv2d for seeds whose output gradients sit on max-pool maxima."""
import torch
import torch.nn.functional as F


def pooled_conv_weight_grad(x_pad: torch.Tensor, vals: torch.Tensor, idx: torch.Tensor, out_size, kernel_size,
                            stride, dilation, groups: int) -> torch.Tensor:
    """dW [N, C_out, C_in/g, kh, kw] for x_pad [B, C_in, Hp, Wp] (already padded), vals [C_out, N, B, P],
    idx [B, C_out, P] (flat oh*Wo + ow in the Ho x Wo conv output; duplicates add):
      dW[n, o, i, a, c] = sum_{b, p} vals[o, n, b, p] x_pad[b, g(o) C_in/g + i, oh sh + a dh, ow sw + c dw].

    The dense output gradient of every seed (vals scattered at idx into zeros [N, B, C_out, Ho Wo]),
    the input cropped to the rows/columns a Ho x Wo conv reads and unfolded (im2col), one einsum per
    group. Accumulates in fp64 for fp64 inputs, fp32 otherwise; returns the input dtype.
    """
    acc = torch.float64 if x_pad.dtype == torch.float64 else torch.float32
    (Ho, Wo), (kh, kw) = out_size, kernel_size
    Co, N, B, P = vals.shape
    C = x_pad.shape[1]
    dense = torch.zeros(N, B, Co, Ho * Wo, dtype=acc, device=x_pad.device)
    dense.scatter_add_(3, idx.unsqueeze(0).expand(N, B, Co, P), vals.to(acc).permute(1, 2, 0, 3))
    hu = (Ho - 1) * stride[0] + dilation[0] * (kh - 1) + 1
    wu = (Wo - 1) * stride[1] + dilation[1] * (kw - 1) + 1
    cols = F.unfold(x_pad[:, :, :hu, :wu].to(acc), (kh, kw), dilation=tuple(dilation), stride=tuple(stride))
    cols = cols.reshape(B, groups, C // groups * kh * kw, Ho * Wo)              # [B, g, C_in/g kh kw, L]
    dense = dense.reshape(N, B, groups, Co // groups, Ho * Wo)                  # [N, B, g, C_out/g, L]
    dw = torch.einsum("nbgol,bgkl->ngok", dense, cols)
    return dw.reshape(N, Co, C // groups, kh, kw).to(x_pad.dtype)
