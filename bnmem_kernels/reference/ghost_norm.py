"""Reference ghost norms (docs/math.md, "Ghost norms")."""
import torch


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 stays fp64; everything else accumulates (and is returned) in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def use_gram(T: int, d_in: int, d_out: int) -> bool:
    """The Gram route wins when its two T x T Grams are smaller than one d_out x d_in matrix."""
    return 2 * T * T < d_in * d_out


def ghost_norm_linear(a: torch.Tensor, g: torch.Tensor, route: str = "auto") -> torch.Tensor:
    """||G_i^T A_i||_F^2 per sample, for a [B, T, d_in] and g [B, T, d_out] -> [B].

    Gram route: <G_i G_i^T, A_i A_i^T>; materialize: sum of squares of G_i^T A_i. Both in fp64 for
    fp64 inputs, fp32 otherwise.
    """
    acc = accumulation_dtype(a.dtype)
    a, g = a.to(acc), g.to(acc)
    gram = use_gram(a.shape[1], a.shape[2], g.shape[2]) if route == "auto" else route == "gram"
    if gram:
        return (torch.bmm(g, g.transpose(1, 2)) * torch.bmm(a, a.transpose(1, 2))).sum(dim=(1, 2))
    return torch.bmm(g.transpose(1, 2), a).square().sum(dim=(1, 2))
