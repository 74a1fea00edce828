"""Diagonal state-space (modal) fits of long-convolution filters, in float64.

A filter of taps h[c, t] (C channels, horizon L) is written, per channel, as its first tap plus S damped
complex exponentials:

    h[0] = h0  (exact),    h[t] ~= Re(sum_s r_s * lam_s ** (t - 1))  for t >= 1,  |lam_s| < 1.

Method: Kung's realization on a sparse Hankel matrix of the taps from offset 1 on: dense first rows and
columns, then geometrically spaced ones (PAIRS rows, COLUMNS columns, each column weighted by the taps
it stands for), every row paired with its successor so that the shift is one tap and no frequency
aliases. Its SVD gives 2S real-order poles (conjugate pairs and real poles); of each pair one pole is
kept, the S carrying the most energy are chosen, and their residues are the least-squares solution over
the whole horizon, whose Gram matrix is a table of geometric sums in closed form. The same SVD gives a
realization of order S too; each channel keeps the better of the two fits. Taps that are zero to
1e-12 of their L2 norm are left out. Channels are fitted CHUNK at a time, about 8 ms per channel on
one CPU core at S = 16 (mostly the batched SVD): some 6 s per 768-channel filter, a few minutes for
GPT-2 small's 24 filters.

Example:
    >>> t = torch.arange(1000, dtype=torch.float64)
    >>> taps = torch.stack([0.99 ** t, 0.9 ** t * torch.cos(0.5 * t)])      # one mode each
    >>> fit = fit_modal(taps, state_size=2)
    >>> bool(fit.error.max() < 1e-9), fit.lam.shape
    (True, torch.Size([2, 2]))
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError, check_int

STATE_SIZE = 4            # smallest state keeping the WikiText student within 0.5% ppl (generation.md)
MAX_RADIUS = 1 - 1e-6     # poles are pulled inside the unit circle to this radius: the recurrence stays stable
PAIRS, COLUMNS = 32, 128  # geometrically spaced Hankel row pairs and columns past the dense block
CHUNK = 128               # channels fitted at once (bounds memory to a few tens of MiB)
BLOCK = 128               # powers lam^t are built as lam^(qB) * lam^j, t = qB + j


def min_horizon(state_size: int) -> int:
    """Fewest taps :func:`fit_modal` can fit with ``state_size`` modes: 8 S + 41.

    Example:
        >>> min_horizon(16)
        169
    """
    return 8 * state_size + 41


def _powers(lam: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi (..., Q), lo (..., BLOCK)) with lam^(qB + j) = hi[q] * lo[j]: products, no logarithms (lam may be 0)."""
    q = -(-n // BLOCK)
    lo = torch.cat([torch.ones_like(lam)[..., None], lam[..., None].expand(*lam.shape, BLOCK - 1)], -1).cumprod(-1)
    big = (lo[..., -1] * lam)[..., None]                                          # lam^B
    hi = torch.cat([torch.ones_like(big), big.expand(*lam.shape, q - 1)], -1).cumprod(-1)
    return hi, lo


def mode_powers(lam: torch.Tensor, n: int) -> torch.Tensor:
    """(..., n) powers lam^t, t = 0..n-1, of complex poles lam (...,).

    Example:
        >>> mode_powers(torch.tensor([0.5 + 0j]), 3)
        tensor([[1.0000+0.j, 0.5000+0.j, 0.2500+0.j]])
    """
    hi, lo = _powers(lam, n)
    return (hi[..., :, None] * lo[..., None, :]).flatten(-2)[..., :n]


def modal_taps(lam: torch.Tensor, residue: torch.Tensor, h0: torch.Tensor, n: int) -> torch.Tensor:
    """(C, n) taps [h0, Re(sum_s r_s lam_s^(t-1)) for t = 1..n-1] of modes lam, residue (C, S) and h0 (C,).

    Example:
        >>> modal_taps(torch.tensor([[0.5 + 0j]]), torch.tensor([[2.0 + 0j]]), torch.tensor([1.0]), 4)
        tensor([[1.0000, 2.0000, 1.0000, 0.5000]])
    """
    hi, lo = _powers(lam, max(n - 1, 1))                                          # (C, S, Q), (C, S, B)
    tail = ((residue[..., None] * hi).mT @ lo).flatten(-2).real[:, : n - 1]       # (C, Q*B) -> (C, n-1)
    return torch.cat([h0[:, None].to(tail.dtype), tail], dim=-1)


def _log(q: torch.Tensor) -> torch.Tensor:
    """Complex logarithm with log 0 = -690 (exp underflows to 0: the sums below stay exact for q = 0)."""
    return torch.complex(q.abs().clamp_min(1e-300).log(), q.angle())


def _geometric(lq: torch.Tensor, m: int) -> torch.Tensor:
    """sum_{t<m} q^t elementwise from lq = log q, accurate as q -> 1 (expm1); q = 1 never occurs (|q| < 1)."""
    return torch.expm1(m * lq) / torch.expm1(lq)


def _transform(lam: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """(C, K) sums sum_t g[c, t] lam[c, k]^t of real g (C, m): two GEMMs on the power tables."""
    c, m = g.shape
    hi, lo = _powers(lam, m)                                                      # (C, K, Q), (C, K, B)
    blocks = nn.functional.pad(g, (0, hi.shape[-1] * BLOCK - m)).view(c, -1, BLOCK).to(lam.dtype)
    return (hi * (lo @ blocks.mT)).sum(-1)                                        # (C, K)


def _least_squares(lam: torch.Tensor, g: torch.Tensor, ridge: float = 1e-14) -> torch.Tensor:
    """Complex c (C, K) minimising ||g - sum_k c_k lam_k^t||: normal equations with closed-form Gram.

    The Gram is scaled to a unit diagonal and given a ``ridge``: a real pole listed with its conjugate
    is a repeated column, whose split between the two copies never changes Re(...) of the fit.
    """
    lq = _log(lam)
    gram = _geometric(lq.conj()[:, :, None] + lq[:, None, :], g.shape[-1])        # (C, K, K)
    d = gram.diagonal(dim1=1, dim2=2).real.rsqrt()                                # (C, K)
    eye = torch.eye(lam.shape[-1], dtype=gram.dtype, device=gram.device)
    scaled = d[:, :, None] * gram * d[:, None, :] + ridge * eye
    return d * torch.linalg.solve(scaled, d * _transform(lam, g).conj())


def _spaced(start: int, stop: int, count: int) -> list[int]:
    """About ``count`` integers geometrically spaced in [start, stop]; empty when stop < start."""
    if stop < start:
        return []
    return sorted({int(round(v)) for v in torch.logspace(math.log10(start), math.log10(stop), count).tolist()})


def _hankel_grid(m: int, order: int):
    """Rows (with the indices of shift pairs r, r + 1) and weighted columns of a sparse Hankel of m taps."""
    dense = min(order + 8, m // 4)
    rows = sorted(set(range(dense + 1)).union(*({p, p + 1} for p in _spaced(dense + 1, m // 2 - 1, PAIRS))))
    where = {r: i for i, r in enumerate(rows)}
    upper = [i for i, r in enumerate(rows) if r + 1 in where]
    lower = [where[rows[i] + 1] for i in upper]
    n = m - rows[-1]                                                              # columns j: rows[-1] + j < m
    cols = sorted(set(range(min(dense, n))) | set(_spaced(dense, n - 1, COLUMNS)))
    weights = torch.tensor(cols[1:] + [n]) - torch.tensor(cols)                   # taps each column stands for
    return torch.tensor(rows), upper, lower, torch.tensor(cols), weights.double()


def _hankel_basis(g: torch.Tensor, order: int):
    """(left singular vectors (C, rows, order) of g's sparse Hankel matrix, upper rows, lower rows)."""
    rows, upper, lower, cols, weights = (t.to(g.device) if torch.is_tensor(t) else t
                                         for t in _hankel_grid(g.shape[-1], order))
    hankel = g[:, rows[:, None] + cols[None, :]] * weights.sqrt()                 # (C, rows, cols)
    # SVD, not eigh of the Gram matrix: the Gram squares the condition and loses the weakest modes.
    return torch.linalg.svd(hankel, full_matrices=False)[0][..., :order], upper, lower


def _poles(basis: torch.Tensor, upper: list[int], lower: list[int]) -> torch.Tensor:
    """(C, order) complex poles of Kung's method: eigenvalues of the one-tap shift of the basis rows."""
    shift = torch.linalg.lstsq(basis[:, upper], basis[:, lower]).solution         # (C, order, order)
    lam = torch.linalg.eigvals(shift)
    radius = lam.abs()
    return torch.where(radius > MAX_RADIUS, lam / radius.clamp_min(1e-300) * MAX_RADIUS, lam)


@dataclass
class ModalFit:
    """Modal form of C filters: lam, residue (C, S) complex128, h0 (C,), error (C,) relative L2 over the
    horizon, and norm (C,) the L2 norm of each channel's taps."""

    lam: torch.Tensor
    residue: torch.Tensor
    h0: torch.Tensor
    error: torch.Tensor
    norm: torch.Tensor

    @property
    def total_error(self) -> float:
        """Relative L2 error of all channels' taps together."""
        return float((self.error * self.norm).norm() / self.norm.norm().clamp_min(1e-300))


def _modes_of_order(lam: torch.Tensor, g: torch.Tensor, state_size: int):
    """The S of the poles lam (C, K) (one per conjugate pair) carrying the most energy, and their residues."""
    c = _least_squares(lam, g)
    # Re(c lam^t) + Re(c' conj(lam)^t) = Re((c + conj(c')) lam^t): a pair is one mode of residue ~2c.
    residue = torch.where(lam.imag == 0, c, 2 * c)
    energy = residue.abs() ** 2 * _geometric(2 * _log(lam).real, g.shape[-1])
    energy = torch.where(lam.imag < 0, torch.full_like(energy, -1.0), energy)
    lam = lam.gather(1, energy.topk(state_size, dim=1).indices)                   # (C, S)
    c = _least_squares(torch.cat([lam, lam.conj()], 1), g)
    return lam, c[:, :state_size] + c[:, state_size:].conj()


def _fit_chunk(g: torch.Tensor, state_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Poles and residues (C, S) for the taps g (C, m) from offset 1 on.

    Realizations of real order 2S and S come from one SVD; each channel keeps the better fit (past the
    taps' own order, the extra poles of order 2S fit noise, and the energy ranking can pick those).
    """
    basis, upper, lower = _hankel_basis(g, 2 * state_size)
    best, best_error = None, None
    for order in sorted({2 * state_size, state_size}, reverse=True):
        lam, residue = _modes_of_order(_poles(basis[..., :order], upper, lower), g, state_size)
        error = (modal_taps(lam, residue, g[:, 0], g.shape[-1] + 1)[:, 1:] - g).norm(dim=1)
        if best is None:
            best, best_error = (lam, residue), error
            continue
        better = (error < best_error)[:, None]
        best = (torch.where(better, lam, best[0]), torch.where(better, residue, best[1]))
        best_error = torch.minimum(error, best_error)
    return best


def fit_modal(taps: torch.Tensor, state_size: int = STATE_SIZE) -> ModalFit:
    """Fit (C, L) filter taps by ``state_size`` complex modes each (see the module notes); float64.

    Example:
        >>> t = torch.arange(400, dtype=torch.float64)
        >>> taps = (0.9 ** t * torch.cos(0.3 * t))[None]                  # one mode: lam = 0.9 e^{0.3i}
        >>> fit = fit_modal(taps, state_size=1)
        >>> fit.lam.shape, fit.error.item() < 1e-9
        (torch.Size([1, 1]), True)
    """
    check_int("state_size", state_size, low=1)
    if taps.dim() != 2 or taps.shape[-1] < min_horizon(state_size):
        raise ConfigError(f"fit_modal needs taps of shape (C, L) with L >= {min_horizon(state_size)} for "
                          f"state_size={state_size}, got {tuple(taps.shape)}; use a longer horizon")
    h = taps.detach().double()
    g = h[:, 1:]                                                                  # (C, L-1), offsets 1..
    tail = torch.einsum("ct,ct->t", g, g).flip(0).cumsum(0).flip(0)              # energy from offset t on
    live = int((tail > 1e-24 * tail[0]).sum()) if tail[0] > 0 else 0
    m = min(max(live, min_horizon(state_size) - 1), g.shape[-1])
    lams, residues = zip(*(_fit_chunk(g[i:i + CHUNK, :m], state_size) for i in range(0, len(g), CHUNK)))
    lam, residue = torch.cat(lams), torch.cat(residues)
    norm = h.norm(dim=1)
    misfit = torch.cat([(modal_taps(lam[i:i + CHUNK], residue[i:i + CHUNK], h[i:i + CHUNK, 0], h.shape[1])
                         - h[i:i + CHUNK]).norm(dim=1) for i in range(0, len(h), CHUNK)])    # a chunk at a time
    error = misfit / norm.clamp_min(1e-300)
    return ModalFit(lam, residue, h[:, 0].clone(), torch.where(norm > 0, error, torch.zeros_like(error)), norm)
