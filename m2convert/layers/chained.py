"""Token-chunked MLPs: a Monarch projection's output handed on unmade, so the next projection runs both.

An MLP ``fc2(act(fc1(x)))`` evaluated one projection at a time holds the whole (N, I) intermediate (384 MiB
at N = 32768, I = 3072 in fp32), the largest tensor of a converted encoder's prefill. When the plan has
folded the activation into ``fc1`` (``MLPLayout.fold``: nothing but the activation module lies between the
two projections, and nothing else reads ``fc1``'s output), ``fc1`` marked with ``chain_output`` returns a
:class:`DeferredOutput` instead: a tensor with the output's shape and dtype but no storage, holding ``fc1``
and its input. ``fc2`` given one runs ``act(fc1(rows))`` and then itself on CHAIN_BYTES-sized groups of
tokens, writing each group's result into its rows of the output, so the intermediate exists a group at a
time (and is still in cache when ``fc2`` reads it).

Anything else that reads a DeferredOutput (a forward hook, an adapter wrapping ``fc2``, a print) gets its
values: the first op on it computes ``fc1``'s whole output once, as an ordinary call would have.
Only eager inference defers (the CPU fast path's conditions); training and traced calls never see one.

Example:
    >>> from m2convert.layers import MonarchLinear
    >>> fc1, fc2 = MonarchLinear(32, 128, activation="gelu"), MonarchLinear(128, 32)
    >>> fc1.chain_output = True
    >>> x = torch.randn(1, 10000, 32)
    >>> with torch.no_grad():
    ...     h = fc1(x)
    ...     y = fc2(h)                                   # (1, 10000, 32), no (1, 10000, 128) tensor made
    ...     torch.allclose(y, fc2(fc1.materialize(x)), atol=1e-5), type(h).__name__, tuple(h.shape)
    (True, 'DeferredOutput', (1, 10000, 128))
"""

from __future__ import annotations

import torch
from torch.utils._pytree import tree_map

# Bytes of the intermediate made per group of tokens: about the size of a core's L2, so fc2 reads fc1's
# result from cache (with the block-major handoff, 128-256-row groups at I = 3072 ran the MLP 7-17% faster
# than 341-row ones, measured at N = 2048 and 8192), and at least MIN_CHAIN_ROWS rows for the GEMMs.
CHAIN_BYTES = 2 << 20
MIN_CHAIN_ROWS = 128


def chain_rows(width: int, itemsize: int) -> int:
    """Tokens per group so that a (rows, width) intermediate is about CHAIN_BYTES."""
    return max(MIN_CHAIN_ROWS, CHAIN_BYTES // max(1, width * itemsize))


class DeferredOutput(torch.Tensor):
    """``layer(x)`` not computed yet: shape (..., layer.out_features), the dtype and device of ``x``.

    The next Monarch projection consumes it group by group (see the module notes); any other op computes
    and keeps the whole value first (:meth:`value`), so readers always see the same numbers.
    """

    @staticmethod
    def __new__(cls, layer, x: torch.Tensor):
        shape = (*x.shape[:-1], layer.out_features)
        out = torch.Tensor._make_wrapper_subclass(cls, shape, dtype=x.dtype, device=x.device)
        out.layer, out.input, out._value = layer, x, None
        return out

    @property
    def made(self) -> bool:
        """Whether the value was computed (and possibly changed in place by whoever read it)."""
        return self._value is not None

    def value(self) -> torch.Tensor:
        """The (..., out) output as a plain tensor, computed on the first call."""
        if self._value is None:
            self._value = self.layer.materialize(self.input)
        return self._value

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **(kwargs or {}))

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        args, kwargs = tree_map(lambda t: t.value() if isinstance(t, DeferredOutput) else t, (args, kwargs or {}))
        return func(*args, **kwargs)

    def __repr__(self) -> str:
        return f"DeferredOutput(shape={tuple(self.shape)}, dtype={self.dtype}, layer={type(self.layer).__name__})"


def blocks_match(first, second) -> bool:
    """Whether ``first``'s output blocks are exactly ``second``'s input blocks (two MonarchLinears, the same
    number of blocks, fc1's output size S = fc2's input size P, nothing cropped or padded).

    Then fc2 reads fc1's (nb, rows, S) block-major result as the kernel's second product wrote it, without
    the copy that interleaves it into (rows, nb * S) rows (5-7% of a chained BERT-base MLP at 2048-8192).
    """
    if not hasattr(second, "block_sizes") or second.nblocks != first.nblocks:          # fc2 not a MonarchLinear
        return False
    s = first.block_sizes[1]
    return first.out_features == first.nblocks * s == second.in_features and second.block_sizes[0] == s


def run_chained(first_out: DeferredOutput, second) -> torch.Tensor:
    """``second(first(x))`` for ``first_out = first(x)`` deferred, a group of tokens at a time.

    Shapes: x (..., first.in_features) -> (..., second.out_features).
    """
    first, x = first_out.layer, first_out.input
    if first_out._value is not None:                          # already made (something read it): use it
        return second(first_out._value)
    rows = x.reshape(-1, x.shape[-1])                                             # (M, in)
    m = rows.shape[0]
    y = torch.empty(m, second.out_features, dtype=x.dtype, device=x.device)      # (M, out)
    step = chain_rows(first.out_features, x.element_size())
    blocks = blocks_match(first, second)
    for start in range(0, m, step):
        stop = min(start + step, m)
        mid = first.eager_rows(rows[start:stop], blocks_out=blocks)               # (rows, I) or (nb, rows, S)
        second.eager_rows(mid, out=y[start:stop], blocks_in=blocks)
    return y.view(*x.shape[:-1], second.out_features)
