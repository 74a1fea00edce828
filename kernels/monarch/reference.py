"""Order-2 Monarch multiply in plain PyTorch: the reference every fused kernel is checked against.

Layout (nb = nblocks, P = in block size, S = out block size, rho = rank of each dense block):

    w1: (nb, nb * rho, P)    right block-diagonal factor R: block k maps input block k (P wide)
                             to nb groups of rho features, group l destined for output block l
    w2: (nb, S, nb * rho)    left block-diagonal factor L: block l gathers group l of every input
                             block (nb * rho wide) and maps it to output block l (S wide)

    y = P2 L P1 R x   with P1 the stride permutation (k, l, j) -> (l, k, j) of the middle features
                      and P2 = identity (output blocks stay contiguous).

The dense matrix this computes has block (l, k) = w2[l, :, k*rho:(k+1)*rho] @ w1[k, l*rho:(l+1)*rho, :],
a product of rank rho: that low-rank-per-block structure is what makes the Frobenius projection of a
dense matrix onto the class a blockwise truncated SVD.
"""

from __future__ import annotations

import torch


def monarch_matmul(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """y = Monarch(w1, w2) @ x along the last dimension.

    Args:
        x: (..., nb * P) input.
        w1: (nb, nb * rho, P) right block-diagonal factor.
        w2: (nb, S, nb * rho) left block-diagonal factor.

    Returns:
        (..., nb * S).

    Example:
        >>> x = torch.randn(2, 7, 12)
        >>> w1, w2 = torch.randn(4, 8, 3), torch.randn(4, 5, 8)   # nb=4, rho=2, P=3, S=5
        >>> monarch_matmul(x, w1, w2).shape
        torch.Size([2, 7, 20])
    """
    nb, mid, p = w1.shape
    nb2, s, mid2 = w2.shape
    if nb2 != nb or mid2 != mid or mid % nb != 0:
        raise ValueError(f"monarch_matmul: factor shapes {tuple(w1.shape)} and {tuple(w2.shape)} do not chain")
    if x.shape[-1] != nb * p:
        raise ValueError(f"monarch_matmul: x has {x.shape[-1]} features, factors expect {nb * p}")
    rho = mid // nb
    lead = x.shape[:-1]
    xb = x.reshape(-1, nb, p).transpose(0, 1)                 # (nb_k, M, P)
    h = torch.bmm(xb, w1.transpose(1, 2))                      # (nb_k, M, nb_l * rho)
    h = h.reshape(nb, -1, nb, rho).permute(2, 1, 0, 3)         # (nb_l, M, nb_k, rho): stride permutation
    h = h.reshape(nb, -1, nb * rho)                            # (nb_l, M, nb_k * rho)
    y = torch.bmm(h, w2.transpose(1, 2))                       # (nb_l, M, S)
    return y.transpose(0, 1).reshape(*lead, nb * s)            # (..., nb_l * S)


def monarch_to_dense(w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """The dense (nb * S, nb * P) matrix of a Monarch factor pair, built block by block.

    Example:
        >>> w1, w2 = torch.randn(4, 8, 3), torch.randn(4, 5, 8)          # nb=4, rho=2, P=3, S=5
        >>> dense = monarch_to_dense(w1, w2)                              # (20, 12)
        >>> x = torch.randn(7, 12)
        >>> torch.allclose(x @ dense.T, monarch_matmul(x, w1, w2), atol=1e-5)
        True
    """
    nb, mid, p = w1.shape
    s = w2.shape[1]
    rho = mid // nb
    a = w2.reshape(nb, s, nb, rho)                             # (l, s, k, j)
    b = w1.reshape(nb, nb, rho, p)                             # (k, l, j, p)
    return torch.einsum("lskj,kljp->lskp", a, b).reshape(nb * s, nb * p)
