"""What makes a large student fit in a recovery run: bf16 autocast, gradient checkpointing, and the
bytes of parameters and optimizer state each process holds (local shards under FSDP2).

``distill`` reads :class:`~.config.DistillConfig`'s ``autocast`` and ``gradient_checkpointing`` and
records :func:`held_bytes` of the training module and its AdamW state in each ``StageResult``.
"""

from __future__ import annotations

import contextlib
from typing import Iterable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import ConfigError

AUTOCAST_DTYPES = {"bf16": torch.bfloat16}


def autocast(mode: str | None, device: torch.device):
    """The forward-pass context of ``DistillConfig(autocast=mode)`` on ``device``: bf16 autocast on
    the device's type (CPU or CUDA), or nothing for None. Weights stay in their own dtype.

    Example:
        >>> with autocast("bf16", torch.device("cpu")):
        ...     y = torch.nn.Linear(4, 3)(torch.randn(2, 4))
        >>> y.dtype
        torch.bfloat16
    """
    if mode is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=AUTOCAST_DTYPES[mode])


def layer_blocks(model: nn.Module) -> list[nn.Module]:
    """The elements of ``model``'s outermost layer lists (``nn.ModuleList``) that hold parameters:
    the transformer blocks, in module order."""
    blocks, lists = [], []
    for path, module in model.named_modules():
        if any(path.startswith(p + ".") for p in lists):
            continue
        if isinstance(module, nn.ModuleList):
            lists.append(path)
            blocks.extend(m for m in module if any(True for _ in m.parameters()))
    return blocks


def _checkpointed(forward):
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return run


def _hf_checkpointing(model: nn.Module) -> bool:
    return bool(getattr(model, "supports_gradient_checkpointing", False)) and hasattr(
        model, "gradient_checkpointing_enable")


@contextlib.contextmanager
def gradient_checkpointing(model: nn.Module, enabled: bool = True):
    """Recompute each transformer block's activations in the backward pass while the context is open.

    Hugging Face models use their own ``activation_checkpointing_enable`` (or
    ``gradient_checkpointing_enable``), non-reentrant; other models get ``torch.utils.checkpoint``
    around the forward of each block of :func:`layer_blocks`. The model's own setting is restored on
    exit. Gradients are the same as without; the blocks' activations are not kept between the
    forward and the backward pass. Blocks only checkpoint in training mode (Hugging Face's rule).

    Example:
        >>> model = transformers.BertModel(transformers.BertConfig(vocab_size=100, hidden_size=32,
        ...     num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)).train()
        >>> with gradient_checkpointing(model):
        ...     model(input_ids=torch.randint(0, 100, (2, 7))).last_hidden_state.sum().backward()
        >>> model.encoder.layer[0].gradient_checkpointing
        False
    """
    if not enabled:
        yield model
        return
    if _hf_checkpointing(model):
        was_on = any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        try:
            yield model
        finally:
            if not was_on:
                off = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
                off()
        return
    blocks = layer_blocks(model)
    if not blocks:
        raise ConfigError(f"gradient_checkpointing: {type(model).__name__} has no layer list (nn.ModuleList of "
                          "blocks) to checkpoint and no gradient_checkpointing_enable; use gradient_checkpointing=False")
    for block in blocks:
        block.forward = _checkpointed(block.forward)
    try:
        yield model
    finally:
        for block in blocks:
            del block.forward


def _local(t: torch.Tensor) -> torch.Tensor:
    to_local = getattr(t, "to_local", None)                 # a DTensor: this rank's shard
    return to_local() if to_local is not None else t


def held_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes this process holds of ``tensors`` (a DTensor counts its local shard only).

    Example:
        >>> held_bytes(torch.nn.Linear(4, 3).parameters())       # (3, 4) + (3,) fp32
        60
    """
    total = 0
    for t in tensors:
        t = _local(t.data if isinstance(t, nn.Parameter) else t)
        total += t.numel() * t.element_size()
    return total


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The state tensors of ``optimizer`` (AdamW: exp_avg, exp_avg_sq and step of each parameter)."""
    return [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
