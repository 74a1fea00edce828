"""What a converted decoder keeps while it decodes, and how fast it decodes: shared by the recall and
WikiText reports.

    state_bytes(model, tokens)          decode state of one sequence after ``tokens`` tokens (bytes)
    decode_tokens_per_s(model, tokens)  new tokens per second after a prompt of ``tokens`` (batch 1)
    kept_heads(model)                   [[layer, head], ...] the attention heads a converted model keeps
"""

from __future__ import annotations

import re
import time

import torch


def _cache_tensors(cache) -> list[torch.Tensor]:
    """Every tensor a transformers Cache holds: keys/values of attention layers, M2 states, kept heads' K/V."""
    out = []
    for layer in getattr(cache, "layers", []):
        state = getattr(layer, "state", None)
        if state is not None:
            state.map_batch(lambda t: out.append(t) or t)
        for t in (*(getattr(layer, "kv", None) or ()), getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor) and t.numel():
                out.append(t)
    return out


@torch.no_grad()
def state_bytes(model, tokens: int, vocab: int | None = None) -> int:
    """Bytes of the decoding cache one sequence holds after a ``tokens``-token prompt and one new token."""
    vocab = vocab or model.config.vocab_size
    ids = torch.randint(1, vocab, (1, tokens), generator=torch.Generator().manual_seed(0))
    out = model.generate(ids, max_new_tokens=1, do_sample=False, return_dict_in_generate=True, use_cache=True,
                         pad_token_id=0)
    return sum(t.numel() * t.element_size() for t in _cache_tensors(out.past_key_values))


@torch.no_grad()
def decode_tokens_per_s(model, tokens: int, new: int = 64, repeats: int = 3) -> float:
    """New tokens per second of cached greedy decoding after a ``tokens``-token prompt (batch 1): the time
    of ``new`` + 1 generated tokens less that of 1, the median of ``repeats``."""
    ids = torch.randint(1, model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0))

    def run(n: int) -> float:
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=True, pad_token_id=0)
        return time.perf_counter() - start

    times = sorted(run(new + 1) - run(1) for _ in range(repeats))
    return new / times[len(times) // 2]


def kept_heads(model) -> list[list[int]]:
    """[[layer, head], ...] the attention heads a converted model keeps (whole layers and head hybrids),
    read from its plan; layers are numbered by the first integer in each attention module's path."""
    out = []
    for site in model.m2convert_plan["sites"]:
        if site["kind"] != "sequence" or not site.get("layout"):
            continue
        layer = int(re.search(r"\.(\d+)\.", f".{site['fqn']}.").group(1))
        if site["status"] != "convert":
            out += [[layer, h] for h in range(site["layout"]["heads"])]
        elif site["settings"].get("kept_groups"):
            sel = site["selection"]["groups"]
            out += [[layer, h] for g in sel if g["kept"] for h in g["heads"]]
    return out
