"""Which attention layers a conversion keeps: a budget, a measured score per layer, and the choice.

``ConvertConfig(keep_layers=K)`` or ``ConvertConfig(keep_kv_bytes=BYTES)`` asks :func:`m2convert.plan` to
keep some attention layers as softmax attention and convert the rest. Each candidate (every attention site
the plan would convert) gets a score from the method in ``ConvertConfig.selection`` (the registry in
:mod:`m2convert.selection.scores`), the best-scored candidates within the budget stay attention, and every
candidate's :class:`~m2convert.passes.site.Selection` (score, rank, kept) is shown by the plan's table,
JSON and HTML.

Example:
    >>> model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=4,
    ...     n_head=2, n_positions=32, bos_token_id=0, eos_token_id=0))
    >>> plan = m2.plan(model, m2.ConvertConfig(keep_layers=2, dimension=False))      # no data: uniform
    >>> [(s.fqn, s.status) for s in plan.sites if s.kind == "sequence"]
    [('transformer.h.0.attn', 'convert'), ('transformer.h.1.attn', 'exclude'),
     ('transformer.h.2.attn', 'convert'), ('transformer.h.3.attn', 'exclude')]
"""

from __future__ import annotations

from m2convert.lazy import lazy_names

_WHERE = {"Budget": "budget", "choose": "budget", "kv_bytes_per_token": "budget", "select_attention": "budget",
          "SCORERS": "scores", "register_scorer": "scores"}
__all__ = sorted(_WHERE)
__getattr__, __dir__ = lazy_names(__name__, _WHERE)      # the command line reads .command without torch
