"""LoRA on the parts of a student that stayed dense, for a stage with ``StageConfig(lora_rank=r)``.

The conversion replaces attention and MLPs with M2 modules; what stays dense (kept attention layers'
projections, MLPs left out of the conversion, heads) can be fine-tuned through a low-rank adapter
instead of in full, so AdamW keeps state for the adapters only. The adapters are ``peft`` LoRA layers
injected in place (same module paths); :func:`merge_lora` folds them back into plain ``nn.Linear``
weights, so the student saves and loads as before.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ..errors import ConfigError
from ..layers import M2Block


def dense_linears(model: nn.Module) -> list[str]:
    """Paths of the ``nn.Linear`` modules of ``model`` that are not M2 modules nor inside one, and whose
    weight no other module shares (a tied output head is left alone: merging into it would change the
    input embeddings too).

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> dense_linears(model)
        ['0', '2']
    """
    counts: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        counts[id(p)] = counts.get(id(p), 0) + 1
    m2_paths = [path for path, m in model.named_modules() if isinstance(m, M2Block)]
    return [path for path, m in model.named_modules()
            if type(m) is nn.Linear and counts.get(id(m.weight), 0) == 1
            and not any(path == p or path.startswith(p + ".") for p in m2_paths)]


@dataclass
class LoRA:
    """The adapters one stage added: ``paths`` of the adapted linears, the parameter names of the
    adapters (which train) and of the adapted linears' own weights (which do not)."""

    paths: list[str]
    adapter_names: set[str] = field(default_factory=set)
    base_names: set[str] = field(default_factory=set)


def add_lora(model: nn.Module, rank: int, alpha: float) -> LoRA:
    """Inject a rank-``rank`` ``peft`` LoRA adapter (scale alpha / rank, B initialised to zero, so the
    model's function is unchanged) into every module of :func:`dense_linears`, in place.

    Shapes: each adapted (out, in) linear gains lora_A (rank, in) and lora_B (out, rank).

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> lora = add_lora(model, rank=2, alpha=4.0)
        >>> sorted(lora.adapter_names)[:2]
        ['0.lora_A.default.weight', '0.lora_B.default.weight']
        >>> merge_lora(model); type(model[0]).__name__
        'Linear'
    """
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise ConfigError("lora_rank > 0 needs the peft package: pip install 'peft>=0.13' "
                          "(or pip install 'm2convert[lora]'), or use lora_rank=0") from None
    paths = dense_linears(model)
    if not paths:
        raise ConfigError("lora_rank > 0, but the student has no dense nn.Linear left to adapt (every linear is "
                          "an M2 module or a tied head); use lora_rank=0")
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    before = set(flags)
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, target_modules=paths), model)
    names = {n for n, _ in model.named_parameters()}
    for n, p in model.named_parameters():                 # peft froze everything else; the stage decides
        p.requires_grad_(flags.get(n.replace(".base_layer", ""), True))
    base = {f"{p}.base_layer.{leaf}" for p in paths for leaf in ("weight", "bias")} & names
    return LoRA(paths, names - before - base, base)


def merge_lora(model: nn.Module) -> None:
    """Fold every LoRA adapter of ``model`` into its linear's weight (W + B A x alpha / rank) and put
    the plain ``nn.Linear`` back at its path; parameter names return to what they were."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return
    adapted = [(path, m) for path, m in model.named_modules() if isinstance(m, LoraLayer)]
    for path, module in adapted:
        module.merge()
        parent_path, _, name = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, name, module.get_base_layer())
