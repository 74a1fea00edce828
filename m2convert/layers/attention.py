"""Attention adapters: M2 sequence mixers that take an HF attention module's place, signature and return.

An adapter is called exactly as the module it replaces (same positional/keyword arguments), recovers the
(B, N) padding mask from whatever mask the model passes, runs an :class:`M2SequenceMixer` and returns
what the original returned (a tensor, or a tuple whose first item is the output and the rest None,
since there are no attention weights).

What HF passes as ``attention_mask`` (transformers 5.x):
- BERT (``BertAttention``): None, or (B, 1, N, N) bool (sdpa; True = attend) or additive float (eager),
  from ``create_bidirectional_mask``; row i lists the keys query i may see, so every row is the padding.
- GPT-2 (``GPT2Attention``), Llama (``LlamaAttention``): None (sdpa without padding) or a (B, 1, N, N)
  causal mask from ``create_causal_mask``; its last row is exactly the padding of the keys.
- Some models pass the raw (B, N) 0/1 mask.
"""

from __future__ import annotations

import sympy
import torch
from torch import nn

from .base import M2Block
from .cache import cache_layer, cached_mix
from .cost import substitute
from .heads import KeptHeads
from .sequence import M2SequenceMixer


def padding_mask(mask: torch.Tensor | None, batch: int, seq_len: int) -> torch.Tensor | None:
    """(B, N) bool keep-mask (True = real token) from an HF attention mask, or None.

    Accepts (B, N) 0/1 or bool, (B, Nq, Nk) and (B, heads, Nq, Nk) bool (True = attend) or additive float
    (0 = attend, a large negative = masked). A token is real when its own query may see its own key
    (the diagonal of the queries' block); a single query row holds the padding of every key (when that
    query is padding itself and sees nothing, the keys any query sees); with a KV cache only the last
    ``seq_len`` keys belong to this input.

    Example:
        >>> m = torch.ones(2, 1, 5, 5, dtype=torch.bool).tril()
        >>> padding_mask(m, 2, 5).shape
        torch.Size([2, 5])
    """
    if mask is None:
        return None
    if hasattr(mask, "mask_mod") and hasattr(mask, "seq_lengths"):        # a flex-attention BlockMask
        mask = _last_row(mask, batch)                                      # (B, Nk) bool
    if mask.dim() not in (2, 3, 4):
        raise ValueError(f"cannot read a padding mask from an attention mask of shape {tuple(mask.shape)}")
    grid = mask[:, 0] if mask.dim() == 4 else mask                        # (B, Nq, Nk) or (B, N)
    if grid.dtype == torch.bool:
        keep = grid
    elif grid.is_floating_point() and mask.dim() > 2:
        keep = grid > torch.finfo(grid.dtype).min / 2                      # additive: 0 keeps, -inf drops
    else:
        keep = grid != 0
    if keep.dim() == 3 and 1 < keep.shape[1] <= keep.shape[2]:
        # Each query's own key: a real token sees itself under causal, bidirectional and sliding-window
        # masks, and padding is masked as a key in every row, its own included.
        nq, nk = keep.shape[1:]
        keep = torch.diagonal(keep[:, :, nk - nq:], dim1=1, dim2=2)     # (B, Nq)
    elif keep.dim() == 3:
        # The last query's keys; a padded last query (a mask made as the outer product of the padding,
        # HF DeBERTa) sees none: then the keys any query sees.
        last = keep[:, -1]                                                # (B, Nk)
        seen = last.any(-1, keepdim=True)                                 # (B, 1)
        # Logical ops, not torch.where: ONNX Runtime has no Where kernel for bool tensors.
        keep = (last & seen) | (keep.any(1) & ~seen)
    return keep[:, -seq_len:].expand(batch, seq_len)


def _last_row(block_mask, batch: int) -> torch.Tensor:
    """(B, Nk) bool: the keys the last query may see under a flex-attention BlockMask's mask_mod."""
    q_len, kv_len = block_mask.seq_lengths
    device = block_mask.kv_num_blocks.device
    rows = block_mask.shape[0] if block_mask.shape[0] > 0 else batch
    head, query = torch.zeros((), dtype=torch.long, device=device), torch.tensor(q_len - 1, device=device)

    def allowed(b, kv):
        return block_mask.mask_mod(b, head, query, kv)

    keys = torch.vmap(torch.vmap(allowed, in_dims=(None, 0)), in_dims=(0, None))(
        torch.arange(rows, device=device), torch.arange(kv_len, device=device))       # (B, Nk)
    return keys.bool().expand(batch, kv_len)


def _dense(mask, x: torch.Tensor):
    """A flex-attention BlockMask as its (B, N) padding (kept heads read tensors); anything else as is."""
    return padding_mask(mask, x.shape[0], x.shape[1]) if hasattr(mask, "mask_mod") else mask


# The forward parameters attention modules take their mask as (HF T5Attention calls it ``mask``).
MASK_NAMES = ("attention_mask", "mask")


class M2Attention(M2Block):
    """Replaces an attention module whose output is its output projection (GPT-2, Llama, ViT...).

    forward(*args, **kwargs) takes the replaced module's arguments; the hidden states (B, N, H) are
    its first parameter ``arg_names[0]``, the mask its ``attention_mask`` (or ``mask``). Returns (B, N, H), or a
    tuple of ``num_outputs`` items (output, None, ...) when the original returned a tuple. With
    ``residual`` (a parameter name, e.g. HF Bloom's "residual"), the (B, N, H) tensor passed as that
    parameter is added to the output, as the replaced module did.

    Example:
        >>> attn = M2Attention(64, "causal", ["hidden_states", "attention_mask"], num_outputs=2)
        >>> attn(torch.randn(2, 9, 64))[0].shape
        torch.Size([2, 9, 64])
    """

    def __init__(self, d_model: int, mode: str, arg_names, num_outputs: int = 0, dropout: float = 0.0,
                 filter_order: int = 128, filter_emb_dim: int = 5, projection_nblocks: int = 0,
                 projection_rank: int = 1, residual: str | None = None, filter_window: int | None = None,
                 window: int | None = None, window_heads=None, window_scale: float | None = None,
                 output_gate: bool = False, d_inner: int | None = None, device=None, dtype=None):
        super().__init__()
        # A mixer of other width than the model (wide heads) has no residual convolution of its input.
        self.mixer = M2SequenceMixer(d_model, mode=mode, filter_order=filter_order,
                                     filter_emb_dim=filter_emb_dim, projection_nblocks=projection_nblocks,
                                     projection_rank=projection_rank, filter_window=filter_window,
                                     window=window, window_heads=window_heads, window_scale=window_scale,
                                     output_gate=output_gate, d_inner=d_inner,
                                     residual_conv=d_inner in (None, d_model), device=device, dtype=dtype)
        self.dropout = nn.Dropout(dropout)
        self.arg_names = tuple(arg_names)
        self.num_outputs = int(num_outputs)
        if residual is not None and residual not in self.arg_names:
            raise ValueError(f"residual={residual!r} is not one of the forward parameters {list(self.arg_names)}")
        self.residual = residual
        self.layer_idx: int | None = None        # the replaced module's slot in a transformers Cache
        self.kept: KeptHeads | None = None       # softmax heads kept beside the mixer (keep_heads)

    def keep_heads(self, kept: KeptHeads) -> None:
        """Make this a head-level hybrid: ``kept``'s heads stay softmax attention, the mixer computes the
        other channels, and ``kept.o_proj`` (the original O) replaces the mixer's out_proj."""
        self.kept = kept
        self.mixer.out_proj = nn.Identity()
    def _argument(self, name: str, args, kwargs):
        """The value passed as forward parameter ``name`` (by keyword or position), or None."""
        if name in kwargs:
            return kwargs[name]
        at = self.arg_names.index(name) if name in self.arg_names else len(args)
        return args[at] if at < len(args) else None

    def _add_residual(self, out: torch.Tensor, args, kwargs) -> torch.Tensor:
        if self.residual is None:
            return out
        residual = self._argument(self.residual, args, kwargs)
        if residual is None:
            raise ValueError(f"{type(self).__name__} adds its '{self.residual}' input to its output, but the "
                             "call passed none")
        return out + residual                                              # (B, N, H)

    def _read_inputs(self, args, kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
        hidden_name = self.arg_names[0] if self.arg_names else None
        x = args[0] if args else kwargs[hidden_name]
        mask = next((m for m in (self._argument(name, args, kwargs) for name in MASK_NAMES) if m is not None), None)
        return x, mask

    def _mix(self, x: torch.Tensor, mask: torch.Tensor | None, args=(), kwargs=None) -> torch.Tensor:
        keep = padding_mask(mask, x.shape[0], x.shape[1])                  # (B, N) or None
        rope = self._argument("position_embeddings", args, kwargs or {})
        y = self.mixer(x, keep, rope)                                      # (B, N, H)
        if self.kept is not None:
            y = self.kept(y, x, _dense(mask, x), rope, self._gate(x))
        return self.dropout(y)                                             # (B, N, H)

    def _cached_mix(self, x: torch.Tensor, mask, cache, args, kwargs) -> torch.Tensor:
        keep = padding_mask(mask, x.shape[0], x.shape[1])                  # (B, n) or None
        rope = self._argument("position_embeddings", args, kwargs)
        y = cached_mix(self.mixer, x, keep, cache, self.layer_idx, rope)   # (B, n, H)
        if self.kept is None:
            return y
        # The kept heads' keys and values join the mixer's state in this layer's cache slot.
        layer = cache_layer(cache, self.layer_idx)
        k, v = self.kept.keys_values(x, rope)                              # (B, groups, n, d) each
        if layer.kv is not None:
            k, v = torch.cat([layer.kv[0], k], dim=2), torch.cat([layer.kv[1], v], dim=2)
        layer.kv = (k, v)
        return self.kept.merge(y, self.kept.attend(x, k, v, _dense(mask, x), rope), self._gate(x))

    def _gate(self, x: torch.Tensor) -> torch.Tensor | None:
        """sigmoid(output_gate(x)) (B, n, H) of a mixer that gates its output, else None."""
        gate = self.mixer.output_gate
        return None if gate is None else torch.sigmoid(gate(x))

    def _pack(self, out: torch.Tensor):
        if self.num_outputs == 0:
            return out
        return (out,) + (None,) * (self.num_outputs - 1)

    def _read_cache(self, args, kwargs):
        """The transformers Cache passed to this call (by keyword or position), or None."""
        for name in ("cache", "past_key_values", "past_key_value", "layer_past"):
            if kwargs.get(name) is not None:
                return kwargs[name]
            if name in self.arg_names and self.arg_names.index(name) < len(args):
                return args[self.arg_names.index(name)]
        return None

    def forward(self, *args, **kwargs):
        x, mask = self._read_inputs(args, kwargs)
        cache = self._read_cache(args, kwargs)
        if cache is not None and self.mixer.mode != "bidirectional":
            # Generation: prompt once, then each new token at O(N) from the state kept in the cache.
            out = self.dropout(self._cached_mix(x, mask, cache, args, kwargs))
            return self._pack(self._add_residual(out, args, kwargs))
        return self._pack(self._add_residual(self._mix(x, mask, args, kwargs), args, kwargs))

    def flops(self, seq_len=None, batch=None) -> sympy.Expr:
        if self.kept is None:
            return self.mixer.flops(seq_len, batch)
        return substitute(self.mixer.flops() + self.kept.flops(), seq_len, batch)

    def extra_repr(self) -> str:
        residual = f", residual={self.residual!r}" if self.residual else ""
        return f"arg_names={list(self.arg_names)}, num_outputs={self.num_outputs}{residual}"


class M2PostNormAttention(M2Attention):
    """Replaces a BERT-style attention block: LayerNorm(x + dropout(mixer(x))).

    HF BERT's ``BertAttention`` holds the attention (Q, K, V) and ``BertSelfOutput`` (O, dropout,
    residual add, LayerNorm); the mixer's out_proj takes O's place and the LayerNorm is kept.

    Example:
        >>> attn = M2PostNormAttention(32, "bidirectional", ["hidden_states", "attention_mask"], 2)
        >>> attn(torch.randn(1, 4, 32), torch.ones(1, 1, 4, 4, dtype=torch.bool))[0].shape
        torch.Size([1, 4, 32])
    """

    def __init__(self, d_model: int, mode: str, arg_names, num_outputs: int = 0, dropout: float = 0.0,
                 filter_order: int = 128, filter_emb_dim: int = 5, norm_eps: float = 1e-12,
                 norm_affine: bool = True, norm_bias: bool = True, projection_nblocks: int = 0,
                 projection_rank: int = 1, filter_window: int | None = None, window: int | None = None,
                 window_heads=None, window_scale: float | None = None, output_gate: bool = False,
                 d_inner: int | None = None, device=None, dtype=None):
        super().__init__(d_model, mode, arg_names, num_outputs, dropout, filter_order, filter_emb_dim,
                         projection_nblocks=projection_nblocks, projection_rank=projection_rank,
                         filter_window=filter_window, window=window, window_heads=window_heads,
                         window_scale=window_scale, output_gate=output_gate, d_inner=d_inner,
                         device=device, dtype=dtype)
        self.norm = nn.LayerNorm(d_model, eps=norm_eps, elementwise_affine=norm_affine,
                                 bias=norm_bias, device=device, dtype=dtype)

    def forward(self, *args, **kwargs):
        x, mask = self._read_inputs(args, kwargs)
        return self._pack(self.norm(x + self._mix(x, mask, args, kwargs)))   # (B, N, H)


ADAPTERS = {"M2Attention": M2Attention, "M2PostNormAttention": M2PostNormAttention}
