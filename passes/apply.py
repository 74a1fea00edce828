"""Apply a plan: build each site's replacement (seeded from the pretrained weights) and swap modules.

One walker (:func:`swap_modules`) does every swap; replacements are all built before the first swap,
so a failure leaves the model as it was, and ``inplace=False`` never touches the caller's model.

Weight mapping (source -> destination, nn.Linear convention (out, in)):
    attention Q (D, H)                 -> mixer.in_proj rows [0, D)      (x1; D = heads x head_dim, H or not)
    attention K (kv_heads * d, H)      -> repeated to (D, H) -> rows [D, 2D)   (x2)
    attention V (kv_heads * d, H)      -> repeated to (D, H) -> rows [2D, 3D)  (v)
    attention O (H, D)                 -> mixer.out_proj
    (projection_nblocks >= 1: the stacked (3H, H) Q|K|V and the O weight are each projected onto a
     MonarchLinear with that many blocks at the site's rank, as MLP linears are)
    BERT-style post-norm LayerNorm     -> adapter.norm
    MLP linear / Conv1D (out, in)      -> MonarchLinear.from_weight (Frobenius projection)
    MoE experts gate_up (E, 2I, H),    -> MonarchExperts: each expert's gate, up and down projected as
      down (E, H, I)                      MonarchLinear.from_weight does; the activation is copied
"""

from __future__ import annotations

import contextlib
import copy
import zlib
from collections.abc import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from m2convert.errors import ConversionError, M2Error
from m2convert.layers.monarch import MonarchLinear
from m2convert.layers.attention import ADAPTERS
from m2convert.layers.heads import KeptHeads
from m2convert.layers.interface import inherit_interface
from m2convert.layers.filters import softmax_taps
from m2convert.passes.attention_bias import SEED_OFFSETS, SEED_STEPS
from m2convert.layers.experts import ACTIVATIONS, MonarchExperts
from m2convert.passes.graph import projection_dims, projection_weight
from m2convert.passes.site import AttentionLayout, ExpertsLayout, MLPLayout, Site


def _role_weight(model: nn.Module, site: Site, role: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    info = site.roles[role]
    weight, bias = projection_weight(model.get_submodule(info.path))      # (out, in), (out,)
    if info.rows is not None:                                               # a fused QKV projection
        weight = torch.cat([weight[a:b] for a, b in info.rows])             # (sum of range widths, in)
        bias = None if bias is None else torch.cat([bias[a:b] for a, b in info.rows])
    return weight.detach(), None if bias is None else bias.detach()


def _repeat_heads(weight, bias, hidden: int, head_dim: int):
    """GQA/MQA K or V (kv_heads * d, H) -> (D, H) (``hidden`` = D, the query heads' channels), each KV head
    repeated for its query heads."""
    kv_heads = weight.shape[0] // head_dim
    if kv_heads * head_dim == hidden:
        return weight, bias
    rep = hidden // (kv_heads * head_dim)
    weight = weight.reshape(kv_heads, head_dim, -1).repeat_interleave(rep, dim=0)   # (heads, d, H)
    weight = weight.reshape(hidden, -1)                                             # (H, H)
    if bias is not None:
        bias = bias.reshape(kv_heads, head_dim).repeat_interleave(rep, dim=0).reshape(hidden)  # (H,)
    return weight, bias


def kept_heads(site: Site, model: nn.Module, groups, seed: bool = True, device=None) -> KeptHeads:
    """The :class:`KeptHeads` branch that keeps the KV groups ``groups`` of the attention site ``site`` of
    ``model`` (its original Q, K, V rows of those heads and its O when ``seed``)."""
    layout: AttentionLayout = site.layout
    original = model.get_submodule(site.fqn)
    o = _role_weight(model, site, "o")
    kept = KeptHeads(layout.hidden, layout.heads, layout.kv_heads, layout.head_dim, groups, causal=bool(site.causal),
                     scale=getattr(original, "scaling", None), out_features=o[0].shape[0],
                     device=device or o[0].device, dtype=o[0].dtype)
    if seed:
        kept.seed(*(_role_weight(model, site, r) for r in ("q", "k", "v")), o)
    return kept


def _attention_replacement(site: Site, model: nn.Module, seed: bool, device) -> dict[str, nn.Module]:
    layout: AttentionLayout = site.layout
    settings = site.settings
    original = model.get_submodule(site.fqn)
    ref, _ = projection_weight(model.get_submodule(site.roles["q"].path))
    kwargs = dict(d_model=layout.hidden, d_inner=layout.inner, mode=site.mode, arg_names=layout.arg_names,
                  num_outputs=layout.num_outputs, dropout=layout.dropout,
                  filter_order=settings["filter_order"], filter_emb_dim=settings["filter_emb_dim"],
                  # Plans saved before projection_nblocks existed mean dense projections.
                  projection_nblocks=settings.get("projection_nblocks", 0), projection_rank=settings.get("rank", 1),
                  filter_window=settings.get("filter_window"), device=device or ref.device, dtype=ref.dtype)
    if layout.output_gate:                      # the attention output gated before O (role "gate")
        kwargs["output_gate"] = True
    if settings.get("window"):                  # exact softmax attention over a window, beside the mixer
        kwargs.update(window=settings["window"], window_heads=(layout.heads, layout.kv_heads, layout.head_dim),
                      window_scale=getattr(original, "scaling", None))
    norm = layout.norm
    if norm is not None:
        kwargs.update(norm_eps=norm.eps, norm_affine=norm.affine, norm_bias=norm.bias)
    if layout.residual is not None:
        kwargs["residual"] = layout.residual
    new = ADAPTERS[layout.adapter](**kwargs)
    # Its slot in a generation cache (GPT-Neo names it layer_id).
    new.layer_idx = getattr(original, "layer_idx", getattr(original, "layer_id", None))
    inherit_interface(new, original)                 # what the model may still ask of its attention modules
    if seed:
        width, head_dim = layout.width, layout.head_dim
        q, o = _role_weight(model, site, "q"), _role_weight(model, site, "o")
        k = _repeat_heads(*_role_weight(model, site, "k"), width, head_dim)
        v = _repeat_heads(*_role_weight(model, site, "v"), width, head_dim)
        new.mixer.seed_projections(q, k, v, o)
        if new.mixer.output_gate is not None:
            weight, gate_bias = _role_weight(model, site, "gate")
            with torch.no_grad():
                new.mixer.output_gate.weight.copy_(weight)
                new.mixer.output_gate.bias.copy_(torch.zeros_like(new.mixer.output_gate.bias)
                                                 if gate_bias is None else gate_bias)
        if new.mixer.window_attention is not None:
            new.mixer.window_attention.seed(q, *(_role_weight(model, site, r) for r in ("k", "v")))
        bias = layout.offset_bias
        if bias is not None and new.mixer.filter.heads == (1 if bias.ahead is None else 2):
            # An offset-only score bias (ALiBi): start the filter as the attention that bias alone gives.
            target, weight = softmax_taps(*bias.profile(SEED_OFFSETS), width)        # (heads_f, D, L)
            fit = new.mixer.filter.fit_taps(target, weight, steps=SEED_STEPS)
            bias.fit_error, bias.fit_corr = fit["fit_error_after"], fit["corr_after"]
        if norm is not None:
            new.norm.load_state_dict(model.get_submodule(norm.path).state_dict())
    if settings.get("kept_groups"):
        # A head-level hybrid: these KV groups' heads stay softmax attention (m2convert.layers.heads).
        new.keep_heads(kept_heads(site, model, settings["kept_groups"], seed, device))
    new.train(original.training)
    return {site.fqn: new}


def _mlp_replacement(site: Site, model: nn.Module, seed: bool, device) -> dict[str, nn.Module]:
    nblocks, rank = site.settings["nblocks"], site.settings["rank"]
    layout = site.layout
    folded = site.roles[layout.fold_role].path if layout.fold is not None else None
    out = {}
    for path in dict.fromkeys(r.path for r in site.roles.values()):     # a fused gate_up linear once
        original = model.get_submodule(path)
        weight, bias = projection_weight(original)                         # (out, in), (out,)
        if seed:
            new = MonarchLinear.from_weight(weight.detach(), None if bias is None else bias.detach(),
                                            nblocks=nblocks, rank=rank)
        else:
            in_f, out_f = projection_dims(original)
            new = MonarchLinear(in_f, out_f, nblocks=nblocks, bias=bias is not None, rank=rank,
                                device=device or weight.device, dtype=weight.dtype)
        if path == folded:
            new.activation = layout.fold                 # applied as the output is written (MLPLayout.fold)
            # fc1 -> act -> fc2 and nothing else reads fc1: fc2 runs both a group of tokens at a time
            # (m2convert.layers.chained), so the (N, I) intermediate is never made whole.
            new.chain_output = layout.fold_role == "fc1" and "fc2" in site.roles
        new.train(original.training)
        out[path] = new
    if folded is not None:
        out[layout.fold_module] = nn.Identity()
    return out


def _experts_replacement(site: Site, model: nn.Module, seed: bool, device) -> dict[str, nn.Module]:
    layout: ExpertsLayout = site.layout
    nblocks, rank = site.settings["nblocks"], site.settings["rank"]
    original = model.get_submodule(site.fqn)

    def param(name):
        return None if name is None else getattr(original, name).detach()

    gate_up, down = param(layout.gate_up), param(layout.down)        # (E, 2I, H), (E, H, I)
    if layout.transposed:                                             # stored (E, in, out)
        gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
    act = getattr(original, layout.act) if layout.act else ACTIVATIONS[layout.activation]
    act = copy.deepcopy(act) if isinstance(act, nn.Module) else act
    if seed:
        new = MonarchExperts.from_weights(gate_up, down, nblocks=nblocks, rank=rank, act=act, gated=layout.gated,
                                          gate_up_bias=param(layout.gate_up_bias), down_bias=param(layout.down_bias),
                                          top_k=layout.top_k)
    else:
        new = MonarchExperts(layout.experts, layout.hidden, layout.intermediate, nblocks=nblocks, rank=rank, act=act,
                             gated=layout.gated, gate_up_bias=layout.gate_up_bias is not None,
                             down_bias=layout.down_bias is not None, top_k=layout.top_k,
                             device=device or down.device, dtype=down.dtype)
    new.train(original.training)
    return {site.fqn: new}


# One replacement builder per site layout type.
BUILDERS = {AttentionLayout: _attention_replacement, MLPLayout: _mlp_replacement,
            ExpertsLayout: _experts_replacement}


def build_replacements(site: Site, model: nn.Module, seed: bool = True, device=None) -> dict[str, nn.Module]:
    """{module path: new module} for one site; seeded from ``model``'s weights when ``seed``.

    Example:
        >>> model = transformers.BertModel(transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1,
        ...     num_attention_heads=2, intermediate_size=64))
        >>> plan = m2.plan(model)
        >>> {path: type(m).__name__ for path, m in build_replacements(plan.sites[0], model).items()}
        {'encoder.layer.0.attention': 'M2PostNormAttention'}
    """
    builder = BUILDERS.get(type(site.layout))
    if builder is None:
        raise ConversionError(f"site '{site.fqn}' ({site.kind}) has layout {type(site.layout).__name__}, which "
                              f"no replacement builder takes (known: {[c.__name__ for c in BUILDERS]})")
    return builder(site, model, seed, device)


def swap_modules(model: nn.Module, replacements: dict[str, nn.Module]) -> nn.Module:
    """The one module walker: put each ``replacements[path]`` at ``path`` in ``model``.

    Every path is checked before the first swap, so a bad path changes nothing.

    Example:
        >>> model = transformers.BertModel(transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1,
        ...     num_attention_heads=2, intermediate_size=64))
        >>> swap_modules(model, {"encoder.layer.0.intermediate.dense": MonarchLinear(32, 64)})
        BertModel(...)
        >>> type(model.encoder.layer[0].intermediate.dense).__name__
        'MonarchLinear'
    """
    for path in replacements:
        try:
            model.get_submodule(path)
        except AttributeError:
            raise ConversionError(f"module path '{path}' does not exist in {type(model).__name__}; "
                                  "was the plan made for another model?") from None
    pending = dict(replacements)

    def walk(module: nn.Module, prefix: str) -> None:
        for name, child in list(module.named_children()):
            fqn = f"{prefix}.{name}" if prefix else name
            if fqn in pending:
                setattr(module, name, pending.pop(fqn))
            elif any(p.startswith(fqn + ".") for p in pending):
                walk(child, fqn)

    walk(model, "")
    return model


@contextlib.contextmanager
def site_rng(seed: int, fqn: str):
    """Seed the CPU RNG for one site's new weights from ``seed`` and its path; restore it afterwards.

    Per-site seeds keep a site's initial filters the same whichever other sites convert.
    """
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(zlib.crc32(f"{seed}:{fqn}".encode()))
        yield


def _seed_path(model: nn.Module, fqn: str) -> str:
    """The site path that seeds its weights; a DataParallel/DDP wrapper's "module." is left out, so a
    wrapped model converts exactly like the bare one."""
    wrapped = isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel))
    return fqn.removeprefix("module.") if wrapped else fqn


# Functions run on every model apply_plan returns, after m2convert_plan is set: later layers attach
# behaviour to converted models here without this layer importing them (m2convert.serialize registers
# the one that makes ``model.save_pretrained`` write an m2convert folder).
CONVERTED_MODEL_HOOKS: list[Callable[[nn.Module], None]] = []


def apply_plan(plan, model: nn.Module | None = None, inplace: bool = False, seed: bool = True) -> nn.Module:
    """Convert ``model`` (default: the planned model) by ``plan``; see :meth:`RewritePlan.apply`."""
    model = plan.model if model is None else model
    if model is None:
        raise ConversionError("this plan holds no model (it was rebuilt from a dict); pass model=...")
    if type(model).__name__ != plan.model_class:
        raise ConversionError(f"the plan was made for {plan.model_class}, got {type(model).__name__}")
    if plan.config.strict and plan.skipped:
        lines = "; ".join(f"'{s.fqn}' ({s.pattern}): {s.reason}" for s in plan.skipped)
        raise ConversionError(f"strict=True and {len(plan.skipped)} site(s) cannot be converted: {lines}. "
                              "Fix the cause, exclude them with overrides {regex: None}, or use strict=False")
    target = model if inplace else copy.deepcopy(model)
    replacements: dict[str, nn.Module] = {}
    for site in tqdm(plan.converted, desc="m2convert: building M2 modules", disable=None, leave=False):
        try:
            with site_rng(plan.config.seed, _seed_path(target, site.fqn)):
                replacements.update(build_replacements(site, target, seed=seed))
        except (M2Error, RuntimeError, ValueError) as exc:
            kind = type(exc).__name__
            raise ConversionError(f"converting site '{site.fqn}' ({site.pattern}) failed: {kind}: {exc}; "
                                  "the input model is unchanged") from exc
    swap_modules(target, replacements)
    target.m2convert_plan = plan.to_dict()
    if any(s.causal for s in plan.converted if isinstance(s.layout, AttentionLayout)):
        # Plain forward calls (training, evaluation) keep no decoding state; generate() still uses its
        # cache, in which the causal mixers keep their O(N)-per-token state (m2convert.layers.cache).
        config = getattr(target, "config", None)
        if config is not None and hasattr(config, "use_cache"):
            config.use_cache = False
    for hook in CONVERTED_MODEL_HOOKS:
        hook(target)
    return target

