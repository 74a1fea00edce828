"""What an attention core's mask says: causal or bidirectional, a sliding window (a causal or two-sided
band) or chunks, read from which keys each query may see on the example inputs; and the windows and
chunks a module or config names where the capture is shorter than them."""

from __future__ import annotations

import torch
from torch import nn

from m2convert.passes.attention_patterns import AttentionCore
from m2convert.passes.graph import GraphIndex


def _allowed(index: GraphIndex, core: AttentionCore):
    """(allowed keys (.., Nq, Nk) bool, None) on the example inputs, or (None, why not)."""
    if isinstance(core.allowed, str):
        return None, core.allowed
    if isinstance(core.allowed, torch.Tensor):
        return core.allowed, None
    node = core.scores if core.scores is not None else core.mask
    key = ("allowed", node)
    if key not in index._cache:
        try:
            index._cache[key] = index.evaluate([node])[node]
        except Exception as exc:                          # a mask built from something we cannot rerun
            index._cache[key] = f"could not evaluate the attention mask: {type(exc).__name__}: {exc}"
    value = index._cache[key]
    if isinstance(value, str):
        return None, value
    if not isinstance(value, torch.Tensor) or value.dim() < 2:
        return None, f"the attention mask '{node.name}' is not a (.., N, N) tensor"
    if value.is_meta:                # capture refuses meta models; meta example inputs still end up here
        return None, ("the attention mask has no values (it was computed on the 'meta' device); plan with "
                      "real weights and example inputs on CPU")
    if core.scores is not None:
        # A key is masked when its probability is exactly 0 in float64: masks (-inf, finfo.min, -1e4)
        # underflow, while biases that are no mask (ALiBi, relative positions, a tanh cap) do not.
        # A query row masked everywhere (a padded query) sees nothing.
        value = value.double()
        seen = value.amax(-1, keepdim=True) > torch.finfo(torch.float32).min / 2
        return (torch.softmax(value, dim=-1) > 0) & seen, None
    return (value if value.dtype == torch.bool else value > torch.finfo(value.dtype).min / 2), None


def causality(index: GraphIndex, core: AttentionCore) -> tuple[bool | None, int | None, str | None]:
    """Read causal vs bidirectional from is_causal or from which keys each query may see: ``(causal,
    window, why)``, window the offsets each query sees per direction in a sliding-window mask (else None)."""
    if core.mask is None and core.scores is None and core.allowed is None:
        return core.is_causal, None, None
    allowed, why = _allowed(index, core)
    if why:
        return None, None, why
    grids = allowed.reshape(-1, *allowed.shape[-2:])                     # (B * heads, Nq, Nk)
    shapes = {_mask_shape(g) for g in grids[:64]}
    if shapes <= {"full", "one"}:
        return core.is_causal, None, None
    if shapes <= {"causal", "one"}:
        return True, None, None
    for kind, causal, fits in (("band", True, {"one", "causal"}), ("sym", False, {"one", "full"})):
        bands = {s for s in shapes if s.startswith(kind + " ")}
        if len(bands) == 1 and shapes <= bands | fits:
            return causal, int(bands.pop().split()[1]), None
    chunks = {s for s in shapes if s.startswith("chunk ")}
    if len(chunks) == 1 and shapes <= chunks | {"one", "causal"}:
        return None, None, chunked(int(chunks.pop().split()[1]), "attention mask")
    return None, None, ("the attention mask is neither full, causal nor a sliding window (prefix-LM or a "
                        "custom pattern); the M2 mixers model only these; exclude the site with overrides")


def _mask_shape(grid: torch.Tensor) -> str:
    """'full', 'causal', 'band W', 'sym W', 'one' (a single real token) or 'other' for an (Nq, Nk) grid of
    allowed keys.

    'band W': causal with each query seeing only itself and the W - 1 keys before it (a sliding window);
    'sym W': each query seeing the keys less than W positions away on either side (an encoder's window);
    'chunk C': causal within chunks of C tokens (Llama 4's chunked attention).

    Padding is left out first: keys no query sees and queries that see no key. A sliding window keeps
    every key (each one sees itself), so it stays a band and reads as 'other', never as padding.
    """
    keys = grid.any(0)                                                   # (Nk,)
    if grid.shape[0] != grid.shape[1]:
        return "full" if bool(grid[grid.any(1)][:, keys].all()) else "other"
    real = keys & grid.any(1)                                            # (N,) real tokens
    sub = grid[real][:, real]                                            # (n, n)
    if sub.shape[0] <= 1:
        return "one"
    if bool(sub.all()):
        return "full"
    if torch.equal(sub, torch.ones_like(sub).tril()):
        return "causal"
    pos = torch.arange(sub.shape[0])
    lag = pos[:, None] - pos[None, :]                                    # query - key
    window = int(lag[sub].max()) + 1 if bool(sub.any()) else 0
    band = (lag >= 0) & (lag < window)
    if window > 0 and torch.equal(sub, band):
        return f"band {window}"
    if window > 0 and torch.equal(sub, lag.abs() < window):
        return f"sym {window}"
    cut = (~sub[:, 0]).nonzero()                                          # the first row that does not see key 0
    chunk = int(cut[0]) if len(cut) else 0
    same = (pos[:, None] // max(chunk, 1)) == (pos[None, :] // max(chunk, 1))
    return f"chunk {chunk}" if chunk > 0 and torch.equal(sub, (lag >= 0) & same) else "other"


def chunked(size: int, where: str) -> str:
    """Why a chunked-attention site (Llama 4) keeps its attention."""
    return (f"chunked attention (chunks of {size} tokens in the {where}: each query sees only the earlier tokens "
            "of its own chunk); a long convolution cannot restart at chunk boundaries, so the layer keeps its "
            "attention")


def chunk_size(module: nn.Module | None, model: nn.Module | None = None) -> int | None:
    """The chunk of a chunked-attention layer (``layer_types`` "chunked_attention" and the config's
    ``attention_chunk_size``), else None."""
    config = getattr(module, "config", None) or getattr(model, "config", None)
    config = config.get_text_config() if config is not None and hasattr(config, "get_text_config") else config
    layer_types, layer = getattr(config, "layer_types", None), getattr(module, "layer_idx", None)
    if not (layer_types and isinstance(layer, int) and layer < len(layer_types)):
        return None
    size = getattr(config, "attention_chunk_size", None)
    return size if layer_types[layer] == "chunked_attention" and isinstance(size, int) and size > 0 else None


def sliding_window(module: nn.Module | None, model: nn.Module | None = None) -> int | None:
    """The window of a sliding-window attention module, read from its attribute or the model config.

    HF Gemma2, Qwen2, ModernBERT set ``sliding_window`` on each attention module (None on global layers);
    Mistral, Phi3, Mixtral read ``config.sliding_window`` for every layer; ``layer_types`` names the
    sliding layers where a config mixes both; GPT-Neo's local layers (``attention_type == "local"``)
    read ``config.window_size``. None for full attention.

    Example:
        >>> config = transformers.MistralConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2,
        ...                                     num_key_value_heads=1, intermediate_size=64, sliding_window=8)
        >>> sliding_window(transformers.MistralModel(config).layers[0].self_attn)
        8
    """
    if module is None:
        return None
    config = getattr(module, "config", None) or getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    if getattr(module, "attention_type", None) == "local":          # GPT-Neo: config.window_size
        window = getattr(config, "window_size", None)
        return window if isinstance(window, int) and window > 0 else None
    # A layer the config types as full attention, or the module as not sliding (EXAONE 4 sets both a
    # window and is_sliding), is global whatever window the module also holds.
    layer_types, layer = getattr(config, "layer_types", None), getattr(module, "layer_idx", None)
    if layer_types and isinstance(layer, int) and layer < len(layer_types):
        if layer_types[layer] != "sliding_attention":
            return None
    if getattr(module, "is_sliding", True) is False:
        return None
    if hasattr(module, "sliding_window"):
        window = module.sliding_window
        return window if isinstance(window, int) and window > 0 else None
    if config is None or getattr(config, "use_sliding_window", True) is False:
        return None
    window = getattr(config, "sliding_window", None)
    return window if isinstance(window, int) and window > 0 else None
