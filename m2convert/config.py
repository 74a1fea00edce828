"""ConvertConfig: every setting of a conversion, validated on construction and JSON round-trippable.

Example:
    >>> cfg = ConvertConfig(nblocks=8, overrides={r"layer\\.0\\.": None})
    >>> ConvertConfig.from_dict(cfg.to_dict()) == cfg
    True
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from .errors import ConfigError, check_choice, check_int

CAUSAL_MODES = ("causal", "causal-monarch")
# How the attention layers a budget keeps are chosen (m2convert.selection): "auto" is "kl" when calibration
# batches are given, else "uniform".
SELECTIONS = ("auto", "kl", "offset-fit", "uniform")
# Sliding-window attention: converted, kept, or "auto": converted when its span passes LOCAL_KEEP_TOKENS.
LOCAL_ATTENTION = ("auto", "convert", "keep")
LOCAL_KEEP_TOKENS = 128

# Settings a per-path override may change, with the validator of each.
SITE_SETTINGS = ("nblocks", "rank", "causal_mode", "filter_order", "filter_emb_dim", "projection_nblocks",
                 "softmax_window")

# Upper limits of the integer settings. Each sequence mixer holds filter MLP layers of
# filter_order x filter_order weights, so 4096 already means 16M weights per layer per mixer (the default
# is 128); filter_emb_dim counts positional features (t plus sin/cos pairs), and 129 is far beyond the
# few the filter needs (default 5). rank is clamped to each block's full rank by MonarchLinear.
# projection_nblocks 0 keeps the mixers' in/out projections dense; softmax_window 0 adds no window attention.
LIMITS = {"nblocks": (1, 4096), "rank": (1, 65536), "filter_order": (1, 4096), "filter_emb_dim": (3, 129),
          "projection_nblocks": (0, 4096), "softmax_window": (0, 1 << 20)}


def check_site_settings(where: str, settings: dict) -> dict:
    """Validate a dict of per-site settings (a subset of SITE_SETTINGS) and return it.

    Example:
        >>> check_site_settings("overrides['x']", {"nblocks": 8})
        {'nblocks': 8}
        >>> check_site_settings("overrides['x']", {"filter_emb_dim": 6})
        Traceback (most recent call last):
        m2convert.errors.ConfigError: overrides['x']['filter_emb_dim']=6 must be odd (t plus sin/cos pairs); use 7
    """
    if not isinstance(settings, dict):
        raise ConfigError(f"{where or 'settings'} must be a dict of settings or None, got {type(settings).__name__}")
    unknown = sorted(set(settings) - set(SITE_SETTINGS))
    if unknown:
        raise ConfigError(f"{where or 'settings'} has unknown settings {unknown}; allowed: {list(SITE_SETTINGS)}")
    for key, value in settings.items():
        name = f"{where}[{key!r}]" if where else key
        if key == "causal_mode":
            check_choice(name, value, CAUSAL_MODES)
        elif key == "projection_nblocks":
            low, high = LIMITS[key]
            check_int(name, value)
            if not low <= value <= high:
                raise ConfigError(f"{name}={value} is out of range [{low}, {high}]; use 0 to keep the sequence "
                                  "mixers' in/out projections dense, or n >= 1 (at most the hidden size) for "
                                  "MonarchLinear projections with n blocks")
        else:
            low, high = LIMITS[key]
            check_int(name, value, low=low, high=high)
            if key == "filter_emb_dim" and value % 2 == 0:
                fix = value + 1 if value + 1 <= high else value - 1
                raise ConfigError(f"{name}={value} must be odd (t plus sin/cos pairs); use {fix}")
    return settings


@dataclass
class ConvertConfig:
    """How m2convert rewrites a model.

    Args:
        nblocks: blocks of each Monarch factor in converted MLP linears (more blocks, fewer parameters),
            1 to 4096.
        rank: Monarch projection rank, 1 to 65536; larger keeps more of the dense weight at more parameters.
        causal_mode: mixer for decoders: "causal" (FFT long conv) or "causal-monarch" (Monarch DFT).
            Encoders always get bidirectional mixers; the plan reads which is which from the graph.
        filter_order: width of the implicit long-conv filter MLP, 1 to 4096 (its layers hold
            filter_order x filter_order weights).
        filter_emb_dim: positional features of that filter, odd, 3 to 129.
        projection_nblocks: the sequence mixers' in/out projections (H -> 3H from attention Q, K, V;
            H -> H from O). 0 (default) keeps them dense nn.Linear; n >= 1 makes them MonarchLinear with
            n blocks per factor, projected from the attention weights at ``rank``. At most the hidden
            size; a larger value skips the site with the reason. 0 to 4096.
        sequence: convert attention sites into M2 sequence mixers.
        dimension: convert dense MLP sites into Monarch MLPs.
        filter_fn: ``filter_fn(module, fqn) -> bool``, asked for every module a site would replace
            (the attention module; each MLP linear); a site converts only if every answer is True.
        overrides: ``{regex: settings | None}``; the first regex found (``re.search``) in a site's path
            or one of its replaced paths gives that site's settings (a dict of the fields above from
            nblocks to projection_nblocks, within the same limits), or excludes the site (None).
        strict: raise ConversionError instead of skipping a site that cannot be converted.
        seq_len: sequence length N at which the plan evaluates its FLOP formulas (per sequence, B = 1).
        seed: seeds the freshly initialised weights of each replacement (the mixers' filters), per site
            from this value and the site's path, so the same model and config always give bit-equal
            converted models; converting leaves the global RNG as it was. 0 to 2**31 - 1.
        keep_layers: attention layers to keep as softmax attention (0: convert every one), chosen by
            ``selection``; the others become M2 mixers.
        keep_kv_bytes: the budget as KV-cache bytes per token instead: the best-scored layers whose K/V
            (2 x kv_heads x head_dim x the model's dtype size each) fit in it.
        keep_heads: the budget as a fraction of all attention heads (0 to 1), kept a KV group at a time
            (every query head of a kept key/value head under GQA / MQA): head-level hybrids, each attention
            module keeping its chosen heads beside the mixer (``m2convert.layers.heads``). At most one of
            keep_layers, keep_kv_bytes and keep_heads.
        selection: how the kept layers are chosen (see ``m2convert.selection``): "kl" (each layer's drop in
            the briefly aligned, fully converted model's KL to the teacher when that layer keeps attention;
            needs calibration batches), "offset-fit" (the layers whose attention a convolution fits worst;
            needs calibration batches), "uniform" (evenly spaced), or "auto": "kl" with calibration
            batches, else "uniform".
        selection_steps: layer-wise transfer steps that align the fully converted model before the
            "kl" scores are measured, 0 to 100000.
        local_attention: sliding-window attention layers: "convert" (a mixer whose filters hold only the
            window's offsets, so each token still sees exactly its window), "keep" (stay attention), or
            "auto": convert windows wider than LOCAL_KEEP_TOKENS tokens (a KV cache of the window's size
            and quadratic work within it) and keep narrower ones, already cheap and exact.
        softmax_window: w >= 1 adds exact softmax attention over the last w tokens (w // 2 on either side
            in encoders) to each converted attention layer's mixer, its Q, K, V seeded from the layer's
            (``M2SequenceMixer(window=w)``): the local copying a convolution loses, at O(N w) work and w
            tokens of keys and values per layer while decoding. 0 (default): none.

    Example:
        >>> ConvertConfig(nblocks=2, dimension=False).nblocks
        2
        >>> ConvertConfig(projection_nblocks=16, dimension=False).projection_nblocks
        16
    """

    nblocks: int = 4
    rank: int = 1
    causal_mode: str = "causal"
    filter_order: int = 128
    filter_emb_dim: int = 5
    projection_nblocks: int = 0
    sequence: bool = True
    dimension: bool = True
    filter_fn: Callable[[Any, str], bool] | None = None
    overrides: dict[str, dict | None] = field(default_factory=dict)
    strict: bool = False
    seq_len: int = 512
    seed: int = 0
    keep_layers: int = 0
    keep_kv_bytes: int = 0
    keep_heads: float = 0.0
    selection: str = "auto"
    selection_steps: int = 50
    local_attention: str = "auto"
    softmax_window: int = 0

    def __post_init__(self):
        check_site_settings("", {k: getattr(self, k) for k in SITE_SETTINGS})
        for name in ("sequence", "dimension", "strict"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be True or False, got {getattr(self, name)!r}")
        check_int("seq_len", self.seq_len, low=1, high=1 << 24)
        check_int("seed", self.seed, low=0, high=(1 << 31) - 1)
        check_int("keep_layers", self.keep_layers, low=0, high=1 << 20)
        check_int("keep_kv_bytes", self.keep_kv_bytes, low=0, high=1 << 40)
        check_choice("selection", self.selection, SELECTIONS)
        check_int("selection_steps", self.selection_steps, low=0, high=100000)
        check_choice("local_attention", self.local_attention, LOCAL_ATTENTION)
        if isinstance(self.keep_heads, bool) or not isinstance(self.keep_heads, (int, float)) \
                or not 0 <= self.keep_heads <= 1:
            raise ConfigError(f"keep_heads={self.keep_heads!r} must be a fraction of the heads in [0, 1], "
                              "e.g. 0.125 for one head in eight")
        budgets = {k: getattr(self, k) for k in ("keep_layers", "keep_kv_bytes", "keep_heads") if getattr(self, k)}
        if len(budgets) > 1:
            raise ConfigError(f"{budgets} are budgets for the same choice; give one of them")
        if self.filter_fn is not None and not callable(self.filter_fn):
            raise ConfigError(f"filter_fn must be callable as filter_fn(module, fqn) -> bool, got {self.filter_fn!r}")
        if not isinstance(self.overrides, dict):
            raise ConfigError("overrides must be a dict {regex: settings | None}, "
                              f"got {type(self.overrides).__name__}")
        for pattern, settings in self.overrides.items():
            if not isinstance(pattern, str):
                raise ConfigError(f"override keys must be regex strings, got {pattern!r}")
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ConfigError(f"override regex {pattern!r} does not compile: {exc}") from None
            if settings is not None:
                check_site_settings(f"overrides[{pattern!r}]", settings)

    @property
    def keeps_attention(self) -> bool:
        """Whether a budget asks for some attention to be kept (keep_layers, keep_kv_bytes or keep_heads)."""
        return bool(self.keep_layers or self.keep_kv_bytes or self.keep_heads)

    def settings_for(self, paths: list[str]) -> tuple[dict | None, str | None]:
        """Site settings for a site touching ``paths``: (settings or None if excluded, matching regex)."""
        base = {k: getattr(self, k) for k in SITE_SETTINGS}
        for pattern, settings in self.overrides.items():
            if any(re.search(pattern, p) for p in paths):
                return (None if settings is None else {**base, **settings}), pattern
        return base, None

    def replace(self, **changes) -> "ConvertConfig":
        """A copy with some fields changed; unknown names raise ConfigError."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ConfigError(f"unknown ConvertConfig fields {unknown}; "
                              f"valid: {[f.name for f in dataclasses.fields(self)]}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """A JSON-able dict of every field but filter_fn (code is not serialised)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "filter_fn"}
        out["overrides"] = {k: (dict(v) if v is not None else None) for k, v in self.overrides.items()}
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "ConvertConfig":
        """Rebuild from :meth:`to_dict` output; unknown keys raise ConfigError."""
        if not isinstance(data, dict):
            raise ConfigError(f"ConvertConfig.from_dict expects a dict, got {type(data).__name__}")
        return cls().replace(**data)
