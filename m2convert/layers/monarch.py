"""MonarchLinear: a drop-in nn.Linear whose weight is an order-2 Monarch matrix.

    M = P2 L P1 R,  R = blockdiag(w1) (nb blocks), P1 = stride permutation, L = blockdiag(w2), P2 = I

computed as two batched GEMMs (see ``m2convert.kernels.monarch.reference``). Sizes that do not divide
into ``nblocks`` are zero-padded on the input side and truncated on the output side.

Eager CPU inference (nothing needs a gradient, not tracing) takes ``kernels.monarch.cpu.monarch_linear``,
the same product laid out for BLAS; training, tracing (torch.compile / torch.export, which the lowering
pass pattern-matches) and other devices run the reference.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import sympy
import torch
from torch import nn

from ..errors import ConfigError, ConversionError, ShapeError, check_choice, check_int
from ..kernels.activations import ACTIVATIONS
from ..kernels.monarch.cpu import monarch_linear
from ..kernels.monarch.reference import monarch_matmul, monarch_to_dense
from .base import M2Block, hooked, traced
from .chained import DeferredOutput, chain_rows, run_chained
from .cost import B, N, substitute
from .dense_view import DenseView


# The CPU fast paths by name: "monarch" (MonarchLinear's BLAS layout, kernels/monarch/cpu.py) and "mixer"
# (M2SequenceMixer's smooth-FFT, channel-blocked core with its filter-spectrum cache, kernels/fftconv/cpu.py).
FAST_PATHS = ("monarch", "mixer")
_disabled: set[str] = set()
# ACTIVATIONS (kernels/activations.py): what a MonarchLinear can apply to its own output, by name; in place
# on the CPU fast path, chunk by chunk as results are written, out of place on the reference path.


@contextmanager
def fast_paths(**enabled: bool):
    """Switch CPU fast paths on or off inside a ``with`` block (to measure them, or to debug one).

    Example:
        >>> layer = MonarchLinear(64, 64, nblocks=4)
        >>> x = torch.randn(8, 64)
        >>> with torch.no_grad():
        ...     fast = layer(x)
        ...     with fast_paths(monarch=False):            # the reference two-GEMM product
        ...         ref = layer(x)
        >>> torch.allclose(fast, ref, atol=1e-5)
        True
    """
    unknown = sorted(set(enabled) - set(FAST_PATHS))
    if unknown:
        raise ConfigError(f"fast_paths got unknown paths {unknown}; known: {list(FAST_PATHS)}")
    before = set(_disabled)
    _disabled.update(k for k, on in enabled.items() if not on)
    _disabled.difference_update(k for k, on in enabled.items() if on)
    try:
        yield
    finally:
        _disabled.clear()
        _disabled.update(before)


def eager_inference(*tensors: torch.Tensor | None, path: str = "monarch") -> bool:
    """True when the CPU fast path ``path`` may replace the reference: enabled (see :func:`fast_paths`),
    eager, no autograd graph, plain CPU tensors (not a quantized or other tensor subclass). Tracers
    (torch.compile, torch.export; see :func:`~m2convert.layers.base.traced`) keep the reference, whose
    graph the lowering pass rewrites.
    """
    if path in _disabled:
        return False
    need_grad = torch.is_grad_enabled()
    for t in tensors:
        if t is None:
            continue
        plain = type(t) in (torch.Tensor, nn.Parameter)
        if not plain or traced(t) or t.device.type != "cpu" or (need_grad and t.requires_grad):
            return False
    return True


@contextmanager
def single_thread():
    """Run the block on one intra-op thread (restored after). Batched float64 SVDs of small blocks are many tiny LAPACK calls; with two OpenMP threads on a
    shared machine each call can wait a scheduler time slice for the second thread (measured: 20 s
    on two busy cores against 0.3 s on one, for the 16 blocks of a 768 x 3072 projection).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def monarch_shape(in_features: int, out_features: int, nblocks: int, rank: int) -> tuple[int, int, int]:
    """Block sizes (P, S, rho) of a Monarch (in -> out) matrix with ``nblocks`` blocks.

    P = ceil(in / nb) and S = ceil(out / nb) are the input and output block sizes; every one of the
    nb x nb blocks of the dense matrix it represents has rank rho = rank * ceil(min(P, S) / nb),
    capped at min(P, S), where the class holds every dense matrix (more would add parameters, not
    expressiveness). rank=1 gives the usual square Monarch (half the dense parameters at nb = 4).

    Example:
        >>> monarch_shape(768, 3072, nblocks=4, rank=1)                   # P = 192, S = 768, rho = 48
        (192, 768, 48)
    """
    check_int("in_features", in_features, low=1)
    check_int("out_features", out_features, low=1)
    check_int("rank", rank, low=1)
    check_int("nblocks", nblocks, low=1, high=min(in_features, out_features))
    p = math.ceil(in_features / nblocks)
    s = math.ceil(out_features / nblocks)
    full = min(p, s)
    rho = min(rank * math.ceil(full / nblocks), full)
    return p, s, rho


class MonarchLinear(M2Block, nn.Linear):
    """y = M x + b with M an order-2 Monarch matrix.

    Args:
        in_features, out_features: as nn.Linear; any sizes (padded/truncated to whole blocks).
        nblocks: blocks of each block-diagonal factor, 1 <= nblocks <= min(in, out). More blocks,
            fewer parameters: about (rank * min(in, out) / nblocks) * (in + out) weights.
        bias: learn an additive bias (out_features,).
        rank: widens the middle dimension; each dense block gets rank * ceil(min(P, S)/nb) factors.
        activation: None, or a name in ACTIVATIONS applied to the output (y = act(M x + b)). The CPU
            fast path applies it to each chunk of the block-major result as it is written: no extra
            pass over the output and no second (..., out) tensor, where an MLP's separate activation
            module costs both (an MLP fc1 at N = 16384, H = 768: 192 MiB).

    Shapes: forward(x: (..., in_features)) -> (..., out_features).

    An nn.Linear to code that looks for linear layers (PEFT's ``target_modules="all-linear"``, which then
    wraps it in a LoRA layer): ``in_features``, ``out_features`` and ``bias`` as in nn.Linear, and
    :attr:`weight` the dense matrix, computed and read-only. Its parameters, and state dict keys, are the
    factors ``w1``, ``w2`` and ``bias``.

    Example:
        >>> layer = MonarchLinear.from_dense(nn.Linear(384, 1536), nblocks=4)
        >>> layer(torch.randn(2, 7, 384)).shape
        torch.Size([2, 7, 1536])
    """

    # Eager inference hands its output to the next MonarchLinear unmade (layers/chained.py); set on an MLP's
    # first projection when nothing but that projection reads it (the plan's MLPLayout.fold).
    chain_output = False

    def __init__(self, in_features: int, out_features: int, nblocks: int = 4, bias: bool = True,
                 rank: int = 1, device=None, dtype=None, activation: str | None = None):
        nn.Module.__init__(self)                    # not nn.Linear's: there is no dense weight parameter
        if activation is not None:
            check_choice("activation", activation, tuple(ACTIVATIONS))
        self.activation = activation
        p, s, rho = monarch_shape(in_features, out_features, nblocks, rank)
        self.in_features, self.out_features = in_features, out_features
        self.nblocks, self.rank = nblocks, rank
        factory = {"device": device, "dtype": dtype}
        self.w1 = nn.Parameter(torch.empty(nblocks, nblocks * rho, p, **factory))   # (nb_k, nb_l*rho, P)
        self.w2 = nn.Parameter(torch.empty(nblocks, s, nblocks * rho, **factory))   # (nb_l, S, nb_k*rho)
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        self.reset_parameters()

    @property
    def weight(self) -> torch.Tensor:
        """The (out_features, in_features) dense matrix this layer applies, as a read-only :class:`DenseView`.

        For code written against nn.Linear (PEFT, transformers) that reads ``weight.shape``, ``.dtype``,
        ``.device`` (free) or uses it in an op (which builds the matrix from the current w1, w2; no
        gradient flows back to them). Writes raise ConversionError; the state dict holds w1, w2 and bias,
        never this matrix.

        Example:
            >>> layer = MonarchLinear(6, 10, nblocks=2)
            >>> layer.weight.shape, layer.weight.dtype
            (torch.Size([10, 6]), torch.float32)
            >>> torch.allclose(layer(torch.ones(6)), layer.weight @ torch.ones(6) + layer.bias, atol=1e-6)
            True
            >>> layer.weight.data += 1
            Traceback (most recent call last):
            m2convert.errors.ConversionError: MonarchLinear.weight is a read-only dense view ...
        """
        if traced(self.w1):
            return self.to_dense().detach()             # under torch.compile / export: the plain matrix
        return DenseView(self)

    @weight.setter
    def weight(self, value) -> None:
        raise ConversionError("MonarchLinear.weight is computed from the factors w1, w2 and cannot be set; build a "
                              "new layer with MonarchLinear.from_weight(weight, bias, nblocks); to quantize, "
                              "m2convert.quantize_int8(model) stores the factors in int8")

    def register_parameter(self, name: str, param) -> None:
        if name == "weight":                            # ``layer.weight = nn.Parameter(...)`` (quantizers)
            MonarchLinear.weight.fset(self, param)      # the setter's ConversionError
        super().register_parameter(name, param)

    @property
    def block_sizes(self) -> tuple[int, int, int]:
        """(P, S, rho): input block, output block and per-block rank."""
        return self.w1.shape[2], self.w2.shape[1], self.w1.shape[1] // self.nblocks

    def reset_parameters(self) -> None:
        # Each factor scaled like nn.Linear's default for its own fan-in.
        p, _, rho = self.block_sizes
        nn.init.uniform_(self.w1, -1 / math.sqrt(p), 1 / math.sqrt(p))
        nn.init.uniform_(self.w2, -1 / math.sqrt(self.nblocks * rho), 1 / math.sqrt(self.nblocks * rho))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ShapeError(f"MonarchLinear expects last dim {self.in_features}, got input of shape {tuple(x.shape)}")
        if isinstance(x, DeferredOutput):
            if eager_inference(self.w1, self.w2, self.bias) and not x.made:
                return run_chained(x, self)                             # token groups through both projections
            x = x.value()                                               # (a hook of the producer read it)
        if eager_inference(x, self.w1, self.w2, self.bias):
            if self.chain_output and x.numel() // x.shape[-1] > chain_rows(self.out_features, x.element_size()) \
                    and not hooked(self):                               # hooks see a whole output
                return DeferredOutput(self, x)                          # made by the next projection
            return self.materialize(x)
        p, s, _ = self.block_sizes
        pad = self.nblocks * p - self.in_features
        if pad:
            x = nn.functional.pad(x, (0, pad))                        # (..., nb * P)
        y = monarch_matmul(x, self.w1, self.w2)                         # (..., nb * S)
        if self.nblocks * s != self.out_features:
            y = y[..., : self.out_features]                             # (..., out)
        y = y if self.bias is None else y + self.bias
        return y if self.activation is None else self._act(1)(y)

    def materialize(self, x: torch.Tensor) -> torch.Tensor:
        """Eager inference product (..., in) -> (..., out), activation included, as one tensor."""
        y = self.eager_rows(x.reshape(-1, x.shape[-1]))                          # (M, out)
        return y.view(*x.shape[:-1], self.out_features)

    def eager_rows(self, rows: torch.Tensor, out: torch.Tensor | None = None, *, blocks_in: bool = False,
                   blocks_out: bool = False) -> torch.Tensor:
        """(M, in) rows -> (M, out) with the CPU kernel (no autograd graph), into ``out`` when given.

        blocks_in / blocks_out: (nb, M, P) block-major input / (nb, M, S) output instead (``x_blocks`` /
        ``out_blocks`` of ``kernels.monarch.cpu.monarch_linear``; see ``chained.blocks_match``).
        """
        pad = self.nblocks * self.block_sizes[0] - self.in_features
        if pad and not blocks_in:
            rows = nn.functional.pad(rows, (0, pad))                             # (M, nb * P)
        return monarch_linear(rows if blocks_in else rows.contiguous(), self.w1, self.w2, self.bias,
                              self.out_features, activation=self._act(0), out=out, x_blocks=blocks_in,
                              out_blocks=blocks_out)

    def _act(self, which: int):
        """The activation's in-place (0) or out-of-place (1) function, or None without one."""
        if getattr(self, "activation", None) is None:
            return None
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"MonarchLinear.activation={self.activation!r} is not one of {sorted(ACTIVATIONS)}")
        act = ACTIVATIONS[self.activation]
        return act.apply if which else act.inplace

    def matmul(self, x: torch.Tensor, *, x_channels_first: bool = False,
               out_channels_first: bool = False) -> torch.Tensor:
        """Inference-only product in a chosen layout: (M, in) or (in, M) -> (M, out) or (out, M).

        For neighbours that work channels first (the sequence mixer's long convolution): BLAS reads and
        writes either layout in place, where ``forward`` plus a transpose would copy. Builds no autograd
        graph; call it under ``torch.no_grad()`` / ``torch.inference_mode()``.

        Example:
            >>> layer = MonarchLinear(64, 96)
            >>> with torch.no_grad():
            ...     layer.matmul(torch.randn(64, 10), x_channels_first=True, out_channels_first=True).shape
            torch.Size([96, 10])
        """
        if x.dim() != 2 or x.shape[0 if x_channels_first else 1] != self.in_features:
            raise ShapeError(f"MonarchLinear.matmul expects a 2-D input with {self.in_features} features on dim "
                             f"{0 if x_channels_first else 1}, got shape {tuple(x.shape)}")
        pad = self.nblocks * self.block_sizes[0] - self.in_features
        if pad:
            x = nn.functional.pad(x, (0, 0, 0, pad) if x_channels_first else (0, pad))
        return monarch_linear(x.contiguous(), self.w1, self.w2, self.bias, self.out_features,
                              x_t=x_channels_first, out_t=out_channels_first, activation=self._act(0))

    def to_dense(self) -> torch.Tensor:
        """The (out_features, in_features) dense weight this layer applies (differentiable in w1, w2)."""
        return monarch_to_dense(self.w1, self.w2)[: self.out_features, : self.in_features]

    @classmethod
    def from_dense(cls, linear: nn.Linear, nblocks: int = 4, rank: int = 1) -> "MonarchLinear":
        """Project an nn.Linear onto the Monarch class (optimal in Frobenius norm); copies the bias."""
        if not isinstance(linear, nn.Linear):
            raise ConfigError(f"from_dense expects an nn.Linear, got {type(linear).__name__}; "
                              "use MonarchLinear.from_weight(weight (out, in), bias) for other layouts")
        return cls.from_weight(linear.weight, linear.bias, nblocks=nblocks, rank=rank)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, nblocks: int = 4,
                    rank: int = 1) -> "MonarchLinear":
        """Project a dense (out, in) weight onto the Monarch class.

        Block (l, k) of the Monarch matrix is a rank-rho product, and the blocks share no parameters,
        so the Frobenius-optimal projection is the best rank-rho approximation of every dense block
        (Eckart-Young): a batched truncated SVD, computed in float64.
        """
        if weight.dim() != 2:
            raise ShapeError(f"from_weight expects a 2-D (out, in) weight, got shape {tuple(weight.shape)}")
        out_f, in_f = weight.shape
        layer = cls(in_f, out_f, nblocks=nblocks, bias=bias is not None, rank=rank,
                    device=weight.device, dtype=weight.dtype)
        p, s, rho = layer.block_sizes
        nb = nblocks
        with torch.no_grad():
            w = torch.zeros(nb * s, nb * p, dtype=torch.float64, device=weight.device)
            w[:out_f, :in_f] = weight.detach().to(torch.float64)
            blocks = w.reshape(nb, s, nb, p).permute(0, 2, 1, 3)             # (l, k, S, P)
            with single_thread():
                u, sv, vh = torch.linalg.svd(blocks, full_matrices=False)     # (l,k,S,m) (l,k,m) (l,k,m,P)
            root = sv[..., :rho].sqrt()
            left = u[..., :rho] * root[..., None, :]                           # (l, k, S, rho)
            right = root[..., :, None] * vh[..., :rho, :]                      # (l, k, rho, P)
            layer.w2.copy_(left.permute(0, 2, 1, 3).reshape(nb, s, nb * rho))  # (l, S, k*rho)
            layer.w1.copy_(right.permute(1, 0, 2, 3).reshape(nb, nb * rho, p)) # (k, l*rho, P)
            if bias is not None:
                layer.bias.copy_(bias.detach())
        return layer

    def flops(self, seq_len=None, batch=None) -> sympy.Expr:
        weights = self.w1.numel() + self.w2.numel()
        expr = B * N * (2 * weights + (self.out_features if self.bias is not None else 0))
        return substitute(expr, seq_len, batch)

    def extra_repr(self) -> str:
        p, s, rho = self.block_sizes
        return (f"in_features={self.in_features}, out_features={self.out_features}, nblocks={self.nblocks}, "
                f"rank={self.rank}, blocks=(P={p}, S={s}, rho={rho}), bias={self.bias is not None}"
                + ("" if getattr(self, "activation", None) is None else f", activation={self.activation!r}"))
