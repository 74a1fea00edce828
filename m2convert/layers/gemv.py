"""Weight storage for one-token decoding: each matrix kept with its longer side contiguous.

Decoding one token per sequence multiplies a few rows by every weight matrix, so its speed is the speed
of reading the weights. On a CPU core that speed depends on the stored orientation: BLAS reads a
(out, in) matrix stored row-major as ``out`` dot products of length ``in``, and one stored column-major
as ``in`` scaled row additions of length ``out``; long contiguous runs stream faster (measured on one
core, weights not in cache: a (768, 192) Monarch block 3.9 GB/s as dot products, 7.4 GB/s stored the
other way; the (2304, 768) input projection 7.0 against 10.1 GB/s).

:func:`lay_out_for_decode` re-stores, in place, each matrix the conversion made (the sequence mixers'
dense projections, every :class:`~m2convert.layers.monarch.MonarchLinear` factor) whose output side is
the longer one, so that its contiguous runs are ``out`` long. Values, shapes, dtypes and state dicts
are unchanged: only the strides differ, and every product involved (``F.linear``, ``torch.bmm``, the
Triton kernels) takes either orientation. :func:`m2convert.to_recurrent` applies it, and so does
loading a recurrent model, so that a saved and loaded model computes bit for bit what the saved one did.

Example:
    >>> layer = MonarchLinear(64, 256, nblocks=4)
    >>> lay_out_for_decode(layer), layer.w2.shape, layer.w2.stride()
    (1, torch.Size([4, 64, 16]), (1024, 1, 64))
"""

from __future__ import annotations

import torch
from torch import nn

from .monarch import MonarchLinear
from .sequence import M2SequenceMixer


def _matrices(model: nn.Module):
    """Each matrix parameter the conversion made: (..., out, in) weights."""
    for module in model.modules():
        if isinstance(module, M2SequenceMixer):
            for proj in (module.in_proj, module.out_proj):
                if type(proj) is nn.Linear:
                    yield proj.weight
        elif isinstance(module, MonarchLinear):
            yield module.w1                                       # (nb, nb * rho, P)
            yield module.w2                                       # (nb, S, nb * rho)


def lay_out_for_decode(model: nn.Module) -> int:
    """Store every converted (…, out, in) matrix of ``model`` with ``out > in`` so that its last two
    dimensions are transposed in memory (strides (..., 1, out)); returns how many were re-stored.

    Idempotent. Does not change values, shapes, state dicts or what a forward computes beyond float
    rounding (BLAS sums in another order).
    """
    changed = 0
    for weight in _matrices(model):
        out, inner = weight.shape[-2:]
        if out <= inner or weight.stride()[-2:] == (1, out):
            continue
        with torch.no_grad():
            stored = weight.detach().transpose(-1, -2).contiguous().transpose(-1, -2)
        weight.data = stored
        changed += 1
    return changed
