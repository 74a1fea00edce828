"""Decoding cache for converted decoders: ``generate()`` from a state per layer instead of an FFT pass.

A causal M2 mixer needs no keys and values: its state is the past long-conv inputs and the short conv's
window (:class:`~m2convert.layers.decode.DecodeState`, O(N) per new token), or, for a mixer made
recurrent by :func:`~m2convert.layers.recurrent.to_recurrent`, a fixed-size modal state
(:class:`~m2convert.layers.decode.RecurrentState`, O(1) per new token in the context length). When a
converted decoder runs with a transformers ``Cache`` (``use_cache=True``, as ``generate()`` does), each
attention adapter keeps that state in an :class:`M2CacheLayer` at its own layer index of the cache: the
prompt runs once through :func:`~m2convert.layers.decode.prefill` (or ``recurrent_prefill``), every
later token through :func:`~m2convert.layers.decode.decode_step` (or ``recurrent_step``): which one
follows from the mixer. Without a cache (``use_cache=False``) the full sequence is recomputed at each
step; both give the same tokens.

Greedy search, sampling and beam search work (beam search reorders the states like a KV cache);
assisted / speculative decoding, which crops the cache, is refused with a clear error.

Example:
    >>> config = transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=1, n_head=2, pad_token_id=0)
    >>> converted = m2.convert(transformers.GPT2LMHeadModel(config).eval())
    >>> ids = torch.randint(1, 100, (1, 5))
    >>> cached = converted.generate(ids, max_new_tokens=8, do_sample=False)       # O(N) per new token
    >>> torch.equal(cached, converted.generate(ids, max_new_tokens=8, do_sample=False, use_cache=False))
    True
"""

from __future__ import annotations

import functools

import torch
from transformers.cache_utils import DynamicLayer

from ..errors import ConversionError
from .decode import (DecodeState, RecurrentState, decode_step, is_recurrent, prefill, recurrent_prefill,
                     recurrent_step)


# Tokens a convolution-form decoding state has room for from the start (B x H x 256 inputs per layer).
MIN_CAPACITY = 256


class M2CacheLayer(DynamicLayer):
    """One layer of a transformers Cache holding an M2 mixer's state (:class:`DecodeState` or
    :class:`RecurrentState`) instead of keys/values.

    Reports the tokens seen as its sequence length (so masks and positions come out right) and
    follows the batch operations of beam search; it cannot be cropped.

    Example:
        >>> from transformers import DynamicCache
        >>> from m2convert.layers import M2SequenceMixer
        >>> cache = DynamicCache()
        >>> y = cached_mix(M2SequenceMixer(16, mode="causal"), torch.randn(1, 5, 16), None, cache, 0)
        >>> type(cache.layers[0]).__name__, cache.layers[0].get_seq_length()
        ('M2CacheLayer', 5)
    """

    is_croppable = False
    is_compileable = False

    def __init__(self):
        super().__init__()
        self.state: DecodeState | RecurrentState | None = None
        # A head-level hybrid's kept heads: (keys, values), each (B, kept KV heads, tokens, d), or None.
        self.kv: tuple[torch.Tensor, torch.Tensor] | None = None

    def lazy_initialization(self, key_states, value_states) -> None:
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        raise ConversionError("a transformers attention layer tried to store keys/values in a cache slot that "
                              "holds an M2 mixer state; two layers share one layer_idx")

    def get_seq_length(self) -> int:
        return 0 if self.state is None else int(self.state.length)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.state, self.kv, self.is_initialized = None, None, False

    def offload(self):
        pass

    def prefetch(self):
        pass

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove != 0 and self.state is not None:
            raise ConversionError("M2 decoding states cannot be cropped (assisted / speculative decoding); "
                                  "generate without an assistant, or with use_cache=False")

    def _batch(self, fn) -> None:
        if self.state is not None:
            self.state.map_batch(fn)
        if self.kv is not None:
            self.kv = (fn(self.kv[0]), fn(self.kv[1]))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._batch(lambda t: t[indices])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._batch(lambda t: t.repeat_interleave(repeats, dim=0))


@functools.cache
def _hybrid_layer_class():
    """M2CacheLayer combined with transformers' LinearAttentionLayer (a hybrid's Mamba or linear-attention
    states in the same slot), or None on a transformers without hybrid cache layers."""
    try:
        from transformers.cache_utils import LinearAttentionCacheLayerMixin, LinearAttentionLayer
    except ImportError:
        return None

    class M2AndLinearAttentionLayer(M2CacheLayer, LinearAttentionLayer):
        def __init__(self, number_of_states: int = 1):
            M2CacheLayer.__init__(self)
            LinearAttentionLayer.__init__(self, number_of_states=number_of_states)

        def lazy_initialization(self, *args, **kwargs) -> None:
            if kwargs and not args:                           # the conv / recurrent states' first update
                LinearAttentionLayer.lazy_initialization(self, **kwargs)

        def offload(self):
            LinearAttentionLayer.offload(self)

        def prefetch(self):
            LinearAttentionLayer.prefetch(self)

        def reset(self) -> None:
            LinearAttentionLayer.reset(self)
            M2CacheLayer.reset(self)

        def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
            LinearAttentionLayer.reorder_cache(self, beam_idx)
            M2CacheLayer.reorder_cache(self, beam_idx)

        def crop(self, tokens_to_remove: int) -> None:
            M2CacheLayer.crop(self, tokens_to_remove)
            LinearAttentionLayer.crop(self, tokens_to_remove)

        def get_seq_length(self) -> int:
            return M2CacheLayer.get_seq_length(self)

        def get_max_length(self) -> int:
            return -1

    M2AndLinearAttentionLayer.linear_base = LinearAttentionCacheLayerMixin
    return M2AndLinearAttentionLayer


def _beside_linear_attention(layer) -> M2CacheLayer:
    """An M2 layer for the slot of ``layer``, keeping what a hybrid's layer holds besides attention (the
    conv and recurrent states of the Mamba or linear-attention block sharing the slot, Falcon-H1)."""
    if not hasattr(layer, "conv_states"):                   # an attention-only slot (and no work under compile)
        return M2CacheLayer()
    hybrid = _hybrid_layer_class()
    if hybrid is None or not isinstance(layer, hybrid.linear_base):
        return M2CacheLayer()
    new = hybrid(getattr(layer, "number_of_states", 1))
    for name, value in vars(layer).items():                  # the other block's states, as it left them
        if name not in ("keys", "values", "is_initialized"):
            setattr(new, name, value)
    return new


def cache_layer(cache, layer_idx: int | None) -> M2CacheLayer:
    """The :class:`M2CacheLayer` at ``layer_idx`` of a transformers Cache, put in place on first use.

    Example:
        >>> from transformers import DynamicCache
        >>> cache_layer(DynamicCache(), 0).get_seq_length()
        0
    """
    cache = getattr(cache, "self_attention_cache", cache)                     # EncoderDecoderCache
    layers = getattr(cache, "layers", None)
    if layers is None or layer_idx is None:
        raise ConversionError(f"cannot keep an M2 decoding state in {type(cache).__name__} (layer index "
                              f"{layer_idx}); pass use_cache=False to recompute the sequence at each step")
    while len(layers) <= layer_idx:
        layers.append(cache.layer_class_to_replicate() if cache.layer_class_to_replicate else DynamicLayer())
    layer = layers[layer_idx]
    if not isinstance(layer, M2CacheLayer):
        if layer.get_seq_length() > 0:
            raise ConversionError(f"cache layer {layer_idx} already holds {layer.get_seq_length()} tokens of "
                                  "keys/values; a cache made by the unconverted model cannot be reused")
        layer = layers[layer_idx] = _beside_linear_attention(layer)
    return layer


def cached_mix(mixer, x: torch.Tensor, keep: torch.Tensor | None, cache, layer_idx: int | None,
               rope=None) -> torch.Tensor:
    """Run a causal mixer on new tokens, keeping its state in ``cache`` at ``layer_idx``.

    The first call (an empty slot) is the prompt: the full mixer output plus a fresh state. Later
    calls take one or more new tokens, each at O(N H) from the state, or O(S H) for a recurrent mixer.

    Args:
        mixer: a causal M2SequenceMixer.  x: (B, n, H) new tokens.  keep: (B, n) padding mask or None
            (only read for the prompt: generated tokens are never padding).
        cache: a transformers Cache.  layer_idx: the layer's slot in it.
        rope: the new tokens' rotary (cos, sin), each (B, n, r) or (n, r), for a mixer with a window
            attention; or None.

    Returns:
        (B, n, H), equal to the last n outputs of the mixer on the whole sequence.

    Example:
        >>> from transformers import DynamicCache
        >>> from m2convert.layers import M2SequenceMixer
        >>> mixer, cache, x = M2SequenceMixer(16, mode="causal").eval(), DynamicCache(), torch.randn(1, 6, 16)
        >>> y = cached_mix(mixer, x[:, :5], None, cache, 0)               # the prompt: (1, 5, 16)
        >>> y_t = cached_mix(mixer, x[:, 5:], None, cache, 0)             # one new token: (1, 1, 16)
        >>> torch.allclose(y_t, mixer(x)[:, 5:], atol=1e-5)
        True
    """
    layer = cache_layer(cache, layer_idx)
    if layer.state is None:
        if is_recurrent(mixer):
            y, layer.state = recurrent_prefill(mixer, x, keep, rope)
        else:
            # Room for as many new tokens as the prompt has, and at least MIN_CAPACITY: regenerating the
            # filter taps for a larger capacity is an O(N) filter-MLP pass (and a compiled step's recompile),
            # so it happens at the prompt and then at each doubling.
            y, layer.state = prefill(mixer, x, keep, capacity=max(2 * x.shape[1], MIN_CAPACITY), rope=rope)
        layer.is_initialized = True
        return y                                                               # (B, n, H)
    if x.shape[0] != layer.state.batch:
        raise ConversionError(f"the cache holds {layer.state.batch} sequences, got a batch of {x.shape[0]}")
    if isinstance(layer.state, RecurrentState) != is_recurrent(mixer):
        raise ConversionError(f"cache layer {layer_idx} holds a {type(layer.state).__name__} but its mixer is "
                              f"{'' if is_recurrent(mixer) else 'not '}recurrent (made recurrent mid-generation?); "
                              "start a new cache")
    step = recurrent_step if isinstance(layer.state, RecurrentState) else decode_step
    steps = [step(mixer, x[:, i:i + 1], layer.state, _token_rope(rope, i)) for i in range(x.shape[1])]
    return torch.cat(steps, dim=1)                                             # (B, n, H)


def _token_rope(rope, i: int):
    """The rotary (cos, sin) of the i-th new token, or None."""
    return None if rope is None else tuple(t[..., i:i + 1, :] for t in rope)
