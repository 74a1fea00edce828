"""Weight-only int8 of a converted model: MonarchLinear's factors and the dense linears beside them.

PyTorch's and torchao's quantizers know ``nn.Linear`` weights; a MonarchLinear holds two block factors
``w1`` (nb, nb*rho, P) and ``w2`` (nb, S, nb*rho) instead. :func:`quantize_int8` stores each factor as
int8 with one float scale per output row of each block (symmetric, round to nearest) in an
:class:`Int8MonarchLinear`, which rebuilds the float factors for each call (the matmuls stay float: the
gain is memory, weights 4x smaller; see docs/quantize.md for the speed), and hands every plain
``nn.Linear`` to torchao's int8 weight-only quantization, or to ``torch.ao``'s dynamic int8 where torchao
is not installed.

Example:
    >>> import torch
    >>> from m2convert.layers import MonarchLinear
    >>> model = torch.nn.Sequential(MonarchLinear(64, 256, nblocks=4), torch.nn.GELU())
    >>> x = torch.randn(3, 64)
    >>> before = model(x)
    >>> quantize_int8(model, linears="none")["monarch"]
    1
    >>> type(model[0]).__name__, model[0].w1_int8.dtype
    ('Int8MonarchLinear', torch.int8)
    >>> bool((model(x) - before).abs().max() < 0.02 * before.abs().max())
    True
"""

from __future__ import annotations

import importlib.util

import torch
from torch import nn

from ..errors import ConfigError
from .base import traced
from .monarch import MonarchLinear

LINEAR_BACKENDS = ("auto", "torchao", "torch.ao", "none")


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 of ``weight`` (..., rows, cols) with one scale per row.

    Returns ``(q, scale)``: q int8 (..., rows, cols) in [-127, 127], scale (..., rows, 1) of the weight's
    dtype, so that ``q * scale`` is within ``scale / 2`` of ``weight`` everywhere.
    """
    scale = weight.abs().amax(dim=-1, keepdim=True).clamp_min(torch.finfo(weight.dtype).tiny) / 127
    q = torch.round(weight / scale).clamp_(-127, 127).to(torch.int8)
    return q, scale


class Int8MonarchLinear(MonarchLinear):
    """A MonarchLinear whose factors are stored int8 with a float scale per block row (weight-only).

    ``w1`` and ``w2`` are read-only float factors rebuilt from ``w1_int8 * w1_scale`` (and ``w2``) once per
    call (on each access outside a call), so every path of MonarchLinear (the CPU kernels, export, the dense view) runs unchanged.
    Its state dict holds ``w1_int8``, ``w1_scale``, ``w2_int8``, ``w2_scale`` and ``bias``; nothing trains.

    Shapes: as MonarchLinear, forward(x: (..., in_features)) -> (..., out_features).
    """

    def __init__(self, layer: MonarchLinear):
        nn.Module.__init__(self)
        self.activation, self.chain_output = layer.activation, layer.chain_output
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.nblocks, self.rank = layer.nblocks, layer.rank
        for name in ("w1", "w2"):
            q, scale = quantize_rows(getattr(layer, name).detach())
            self.register_buffer(f"{name}_int8", q)
            self.register_buffer(f"{name}_scale", scale)
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if traced(x) or traced(self.w1_int8):
            return super().forward(x)
        self._factors = (self._float("w1"), self._float("w2"))      # rebuilt once for this call
        try:
            return super().forward(x)
        finally:
            self._factors = None

    def _float(self, name: str) -> torch.Tensor:
        scale = getattr(self, f"{name}_scale")
        return getattr(self, f"{name}_int8").to(scale.dtype) * scale

    @property
    def w1(self) -> torch.Tensor:
        """(nb, nb*rho, P) float factor: ``w1_int8 * w1_scale`` (built once per forward)."""
        factors = self.__dict__.get("_factors")
        return factors[0] if factors else self._float("w1")

    @property
    def w2(self) -> torch.Tensor:
        """(nb, S, nb*rho) float factor: ``w2_int8 * w2_scale`` (built once per forward)."""
        factors = self.__dict__.get("_factors")
        return factors[1] if factors else self._float("w2")

    @property
    def block_sizes(self) -> tuple[int, int, int]:
        """(P, S, rho), read from the int8 factors' shapes."""
        return self.w1_int8.shape[2], self.w2_int8.shape[1], self.w1_int8.shape[1] // self.nblocks

    def extra_repr(self) -> str:
        return super().extra_repr() + ", int8 weights"


def quantized_modules(model: nn.Module) -> list[str]:
    """Names of ``model``'s modules that hold quantized weights (int8 factors, tensor subclasses, packed
    torch.ao weights), in module order; empty for a float model."""
    found = []
    for name, module in model.named_modules():
        own = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
        if isinstance(module, Int8MonarchLinear) or type(module).__module__.startswith("torch.ao.nn.quantized") \
                or any(type(t) not in (torch.Tensor, nn.Parameter) for t in own):
            found.append(name or type(module).__name__)
    return found


def _is_plain_linear(module: nn.Module, fqn: str = "") -> bool:
    return type(module) is nn.Linear


def _linear_backend(choice: str) -> str:
    if choice not in LINEAR_BACKENDS:
        raise ConfigError(f"quantize_int8(linears={choice!r}): choose one of {', '.join(LINEAR_BACKENDS)}")
    has_torchao = importlib.util.find_spec("torchao") is not None
    if choice == "torchao" and not has_torchao:
        raise ConfigError("quantize_int8(linears='torchao'): torchao is not installed; `pip install torchao`, "
                          "or pass linears='torch.ao' (dynamic int8, in PyTorch itself)")
    if choice == "auto":
        return "torchao" if has_torchao else "torch.ao"
    return choice


def _quantize_linears(model: nn.Module, backend: str) -> int:
    count = sum(1 for m in model.modules() if _is_plain_linear(m))
    if backend == "none" or not count:
        return 0
    if backend == "torchao":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
        quantize_(model, Int8WeightOnlyConfig(), filter_fn=_is_plain_linear)
    else:
        from torch.ao.quantization import quantize_dynamic
        quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8, inplace=True)
    return count


@torch.no_grad()
def quantize_int8(model: nn.Module, *, linears: str = "auto") -> dict:
    """Quantize ``model``'s weights to int8 in place, for CPU inference.

    Every MonarchLinear becomes an :class:`Int8MonarchLinear` (its factors int8, a scale per block row);
    every plain ``nn.Linear`` (the mixers' dense projections, kept attention, MLPs left dense, heads) is
    quantized by ``linears``: ``"torchao"`` (int8 weight-only), ``"torch.ao"`` (PyTorch's dynamic int8:
    int8 weights, activations quantized per call), ``"auto"`` (torchao where installed, else torch.ao) or
    ``"none"``. Embeddings, norms and the implicit filters stay float.

    Quantize after loading: the quantized model runs, exports and serves, but save the float model (its
    state dict is what every loader reads). Returns ``{"monarch": n, "linear": n, "linears": backend}``.
    """
    backend = _linear_backend(linears)
    model.eval()
    monarch = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, MonarchLinear) and not isinstance(child, Int8MonarchLinear):
                setattr(parent, name, Int8MonarchLinear(child))
                monarch += 1
    linear = _quantize_linears(model, backend)
    return {"monarch": monarch, "linear": linear, "linears": backend if linear else "none"}
