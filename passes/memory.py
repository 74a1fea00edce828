"""Predicted prefill memory: activation elements per token at each site's peak, and the model's peak at N.

An encoder's (or a decoder's prefill) forward runs one layer at a time, so its activation memory is the
residual stream the callers hold plus the largest set of tensors one site keeps alive at once. Per token,
with H the width and I the MLP width (elements, B = 1):

    residual stream        2H    the embedding output (held by the model's forward) and the layer's input
    attention (SDPA)       4H    Q, K, V and the attention output during the core (before conversion)
    M2 mixer               max(H + 3 min(G, H), 3H)    its (B, H, N) output plus one in-projection group of
                                 G = PROJECT_CHANNELS channels; then output, residual sum and norm
    MLP fc1 -> act -> fc2  max(H + 2I, 4H + I)   input, fc1 output and activation; then fc2, sum, norm with
                                 the intermediate still referenced (separate activation module)
    folded activation      max(H + I, 4H + I)    one (N, I) tensor (MLPLayout.fold)
    chained MLP            4H    input, fc2 output, sum, norm: the intermediate exists a token group at a time
    gated MLP              H + 3I   input, act(gate), up and their product

Converted models add the CPU kernels' fixed buffers (Monarch chunks, FFT channel blocks, one chained
token group), alive only while a kernel runs: a site's kernel phase holds fewer (N, H) tensors than its
peak when the peak comes after the kernels (a chained MLP: 4H while its token groups run, then 6H with
fc2's output, the sum and the norm), so the prediction is the larger of the two phases, largest site first.
The prediction is of the tensors alive at once (``m2convert.bench_memory.live_peak_mb``
measures that). The resident set (what ``m2convert bench`` reports as peak) also holds what glibc keeps
of freed blocks: blocks under its 32 MiB mmap threshold come from the heap, which is only trimmed at its
top, so while the (N, H) tensors are under 32 MiB the resident peak runs tens of MiB above the live one
(benchmarks/results/throughput.md shows both). The filter-spectrum cache (at most
``M2SequenceMixer.filter_cache_total_bytes``) is left out: it is full only at short N.

Example:
    >>> site_elements("mlp", hidden=768, inner=3072, chained=True) // 768      # 2H stream + 4H
    6
"""

from __future__ import annotations

from m2convert.kernels.fftconv.cpu import BLOCK_BYTES, PROJECT_CHANNELS
from m2convert.kernels.monarch.cpu import CHUNK_ELEMENTS
from m2convert.layers.chained import CHAIN_BYTES

STREAM = 2                            # (N, H) tensors the callers hold through every layer
KERNEL_BUFFERS = 3 * CHUNK_ELEMENTS * 4 + CHAIN_BYTES + 4 * BLOCK_BYTES      # bytes, fp32


def _mixer_core(hidden: int) -> int:
    """Elements per token an M2 mixer holds during its core: its (N, H) output and one in-projection group."""
    return hidden + 3 * min(PROJECT_CHANNELS, hidden)


def site_elements(kind: str, hidden: int, inner: int = 0, *, converted: bool = False, chained: bool = False,
                  folded: bool = False, gated: bool = False) -> int:
    """Elements per token alive at a site's peak, residual stream included (see the module notes).

    Args:
        kind: "attention" or "mlp".  hidden: H.  inner: I (MLP sites).
        converted: the M2 form (attention sites).  chained / folded / gated: the MLP's form.
    """
    h, i = hidden, inner
    if kind == "attention":
        own = max(_mixer_core(h), 3 * h) if converted else 4 * h
    elif gated:
        own = h + 3 * i
    elif chained:
        own = 4 * h
    else:
        own = max(h + (1 if folded else 2) * i, 4 * h + i)
    return STREAM * h + own


def kernel_elements(kind: str, hidden: int, inner: int = 0, **form) -> int:
    """Elements per token alive while a converted site's CPU kernels (and their buffers) run: the
    residual stream plus, for an M2 mixer, its output and one in-projection group (its residual sum and
    norm come after the core); for a chained MLP, its input and fc2 output (its sum and norm come after
    its token groups); otherwise the site's whole peak (:func:`site_elements`; ``form`` as there)."""
    if kind == "attention" and form.get("converted"):
        return STREAM * hidden + _mixer_core(hidden)
    if kind == "mlp" and form.get("chained") and not form.get("gated"):
        return STREAM * hidden + 2 * hidden
    return site_elements(kind, hidden, inner, **form)


def predicted_peak(elements_per_token: int, n: int, batch: int = 1, itemsize: int = 4,
                   converted: bool = True, kernel_elements_per_token: int | None = None) -> int:
    """Predicted bytes of tensors alive at once during one prefill at length n: the larger of the
    largest site's live elements and, for a converted model, the kernel phase's elements
    (``kernel_elements_per_token``, default the same) plus the kernels' buffers.

    Example:
        >>> predicted_peak(6 * 768, 8192, kernel_elements_per_token=4 * 768) == 6 * 768 * 8192 * 4
        True
    """
    tokens = batch * n * itemsize
    peak = tokens * elements_per_token
    if not converted:
        return peak
    during = elements_per_token if kernel_elements_per_token is None else kernel_elements_per_token
    return max(peak, tokens * during + KERNEL_BUFFERS)
