"""Batches for recovery: deterministic resumable batch sequences, collates and ``load_data``.
See :mod:`m2convert.data` for the overview."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterable

import torch

from ..errors import ConfigError, DataError, check_choice, check_int
from .readers import ON_BAD, RowReport, _blocks, _rows_to_examples, pack_text, read_jsonl, read_tsv

log = logging.getLogger("m2convert.data")
# The model input a batch is counted and placed by: token ids for text, images for vision models.
INPUT_KEYS = ("input_ids", "pixel_values")


def primary_input(batch: dict) -> torch.Tensor | None:
    """The batch's ``input_ids`` (B, N) or, for vision models, ``pixel_values`` (B, C, H, W); None if neither."""
    return next((batch[k] for k in INPUT_KEYS if torch.is_tensor(batch.get(k))), None)


def batch_items(batch: dict) -> int:
    """What a batch counts for in token budgets and tokens/s: its real tokens (attention_mask's sum, else
    every input id) for text, its images for vision batches."""
    mask = batch.get("attention_mask")
    if torch.is_tensor(mask):
        return int(mask.sum())
    if torch.is_tensor(batch.get("input_ids")):
        return batch["input_ids"].numel()
    first = primary_input(batch)
    return 0 if first is None else first.shape[0]


class Batches:
    """A deterministic, resumable sequence of dict batches over indexed examples.

    Batch ``k`` of rank ``r`` (of ``world``) is global batch ``k * world + r``; epoch e of the
    global batches is a fixed permutation seeded by (seed, e). Iteration never ends (epochs repeat).
    ``bucket=True`` groups examples of similar length into batches (less padding), batches still
    in random order.

    Shapes: ``batch(k)`` -> dict of (B, N) tensors (+ ``labels`` (B,) or (B, N)).

    Example:
        >>> from m2convert.loading import bundled_model_path                 # all-MiniLM-L6-v2, offline
        >>> tokenizer = transformers.AutoTokenizer.from_pretrained(bundled_model_path())
        >>> rows = ["label\\tsentence"] + [f"{i % 2}\\ta {'fine ' * (i + 1)}film" for i in range(12)]
        >>> _ = open("reviews.tsv", "w").write("\\n".join(rows) + "\\n")
        >>> from m2convert.data import load_data
        >>> src = load_data("reviews.tsv", tokenizer, batch_size=8)
        >>> src.batch(0)["input_ids"].shape[0]
        8
        >>> torch.equal(src.batch(3)["input_ids"], src.batch(3)["input_ids"])   # a pure function of (seed, k)
        True
    """

    def __init__(self, examples: list, collate, batch_size: int, *, shuffle: bool = True, seed: int = 0,
                 report: RowReport | None = None, rank: int = 0, world: int = 1, bucket: bool = False):
        check_int("batch_size", batch_size, low=1)
        if len(examples) < batch_size * world:
            raise DataError(f"{len(examples)} examples cannot fill one batch of {batch_size} on {world} ranks")
        self.examples, self.collate, self.batch_size = examples, collate, batch_size
        self.shuffle, self.seed, self.report = shuffle, seed, report
        self.rank, self.world, self.bucket = rank, world, bucket
        self.per_epoch = len(examples) // batch_size                 # global batches per epoch
        self._perm: tuple[int, torch.Tensor] | None = None

    def shard(self, rank: int, world: int) -> "Batches":
        """The same data split for data-parallel rank ``rank`` of ``world``."""
        return Batches(self.examples, self.collate, self.batch_size, shuffle=self.shuffle, seed=self.seed,
                       report=self.report, rank=rank, world=world, bucket=self.bucket)

    def _order(self, epoch: int) -> torch.Tensor:
        if self._perm is None or self._perm[0] != epoch:
            n = len(self.examples)
            gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            order = torch.randperm(n, generator=gen) if self.shuffle else torch.arange(n)
            if self.bucket:
                order = self._bucketed(order, gen)
            self._perm = (epoch, order)
        return self._perm[1]

    def _bucketed(self, order: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        # Sort windows of 50 batches by length, cut them into batches, shuffle the batches:
        # batches hold similar lengths (little padding) and still come in random order.
        bs, window = self.batch_size, self.batch_size * 50
        lengths = torch.tensor([len(e["input_ids"]) if isinstance(e, dict) else len(e) for e in self.examples])
        chunks = [c[torch.argsort(lengths[c], stable=True)] for c in order.split(window)]
        flat = torch.cat(chunks)
        whole = len(flat) // bs * bs
        batches = flat[:whole].view(-1, bs)
        return torch.cat([batches[torch.randperm(len(batches), generator=gen)].reshape(-1), flat[whole:]])

    def batch(self, k: int) -> dict[str, torch.Tensor]:
        g = k * self.world + self.rank
        epoch, i = divmod(g, self.per_epoch)
        idx = self._order(epoch)[i * self.batch_size:(i + 1) * self.batch_size]
        return self.collate([self.examples[j] for j in idx.tolist()])

    def __iter__(self):
        k = 0
        while True:
            yield self.batch(k)
            k += 1


class StreamBatches:
    """Batches from a user iterable (a DataLoader, a list of dicts), read in order.

    ``batch(k)`` must be asked for in increasing k; a resumed run skips the first k batches by
    reading them. A re-iterable source restarts when exhausted; a one-shot iterator raises DataError.
    Bad batches (not a dict of tensors, neither ``input_ids`` nor ``pixel_values``) are counted and skipped or raised.

    Example:
        >>> src = StreamBatches([{"input_ids": torch.zeros(2, 5, dtype=torch.long)}])
        >>> src.batch(0)["input_ids"].shape
        torch.Size([2, 5])
    """

    def __init__(self, iterable: Iterable, *, on_bad: str = "skip", rank: int = 0, world: int = 1):
        check_choice("on_bad", on_bad, ON_BAD)
        self.iterable, self.on_bad, self.rank, self.world = iterable, on_bad, rank, world
        self.report = RowReport(f"<{type(iterable).__name__}>")
        self._it, self._next, self._seen = None, 0, 0

    def shard(self, rank: int, world: int) -> "StreamBatches":
        return StreamBatches(self.iterable, on_bad=self.on_bad, rank=rank, world=world)

    def _raw(self):
        if self._it is None:
            self._it = iter(self.iterable)
        try:
            return next(self._it)
        except StopIteration:
            if iter(self.iterable) is self.iterable:
                raise DataError(f"the batch iterator ran out after {self._seen} batches; pass a re-iterable "
                                "source (a list or DataLoader) or fewer steps") from None
            self._it = iter(self.iterable)
            return next(self._it)

    def _good(self) -> dict[str, torch.Tensor]:
        for _ in range(1000):
            b = self._raw()
            self._seen += 1
            if isinstance(b, dict) and primary_input(b) is not None and all(torch.is_tensor(v) for v in b.values()):
                self.report.rows += 1
                return b
            self.report.add_bad(self._seen, "batch is not a dict of tensors with 'input_ids' or 'pixel_values'",
                                self.on_bad)
            self.report.log()
        raise DataError(f"{self.report.source}: no usable batch in 1000 tries")

    def batch(self, k: int) -> dict[str, torch.Tensor]:
        g = k * self.world + self.rank
        if g < self._next:
            raise DataError(f"batch {k} was already read from this stream; streams only go forward")
        while True:
            b = self._good()
            self._next += 1
            if self._next - 1 == g:
                return b


def classification_collate(tokenizer):
    """Collate {"input_ids": [...], "label": int} examples into padded batches (B, N) + labels (B,).

    Example:
        >>> from m2convert.loading import bundled_model_path                 # all-MiniLM-L6-v2, offline
        >>> tokenizer = transformers.AutoTokenizer.from_pretrained(bundled_model_path())
        >>> batch = classification_collate(tokenizer)([{"input_ids": [101, 7, 102], "label": 1},
        ...                                            {"input_ids": [101, 102], "label": 0}])
        >>> batch["input_ids"], batch["attention_mask"], batch["labels"]
        (tensor([[101,   7, 102],
                [101, 102,   0]]), tensor([[1, 1, 1],
                [1, 1, 0]]), tensor([1, 0]))
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def collate(rows: list[dict]) -> dict[str, torch.Tensor]:
        n = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), n), pad, dtype=torch.long)
        mask = torch.zeros(len(rows), n, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r["input_ids"])] = torch.tensor(r["input_ids"])
            mask[i, : len(r["input_ids"])] = 1
        out = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in tokenizer.model_input_names:
            out["token_type_ids"] = torch.zeros_like(ids)
        if rows[0].get("label") is not None:
            out["labels"] = torch.tensor([r["label"] for r in rows], dtype=torch.long)
        return out

    return collate


def lm_collate(rows: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Stack (block_size,) id blocks into a causal-LM batch; labels are the inputs (models shift).

    Example:
        >>> batch = lm_collate([torch.tensor([5, 6, 7]), torch.tensor([8, 9, 10])])
        >>> batch["input_ids"].shape, torch.equal(batch["labels"], batch["input_ids"])
        (torch.Size([2, 3]), True)
    """
    ids = torch.stack(rows)                                            # (B, block)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def tokenize_examples(texts: list[str], labels: list[int] | None, tokenizer, max_length: int) -> list[dict]:
    """Tokenise texts (with the tokenizer's special tokens, truncated) into collatable examples.

    Example:
        >>> from m2convert.loading import bundled_model_path                 # all-MiniLM-L6-v2, offline
        >>> tokenizer = transformers.AutoTokenizer.from_pretrained(bundled_model_path())
        >>> tokenize_examples(["a fine film", "dull"], [1, 0], tokenizer, max_length=4)
        [{'input_ids': [101, 1037, 2986, 102], 'label': 1}, {'input_ids': [101, 10634, 102], 'label': 0}]
    """
    enc = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    return [{"input_ids": ids, "label": None if labels is None else labels[i]} for i, ids in enumerate(enc)]


def load_data(data: Any, tokenizer=None, *, batch_size: int = 32, max_length: int = 128,
              block_size: int = 128, task: str = "auto", on_bad: str = "skip", shuffle: bool = True,
              seed: int = 0, text_column: str | None = None, label_column: str = "label",
              bucket: bool = False):
    """Turn ``data`` into a resumable batch source (:class:`Batches` or :class:`StreamBatches`).

    Args:
        data: a file path (.tsv, .csv, .jsonl/.json, anything else = plain text), a Hugging Face dataset,
            an iterable of dict batches, or an existing Batches/StreamBatches (returned as is).
        tokenizer: the teacher's tokenizer; needed for files and datasets.
        task: "auto" | "classification" | "lm". "auto": labelled rows -> classification (each row cut at
            ``max_length`` tokens), plain text or unlabelled rows -> lm (packed into blocks of
            min(``block_size``, ``max_length``) tokens).
        on_bad: "skip" (count, log, skip) or "raise" (DataError naming file and line).
        bucket: batch classification examples of similar length together (less padding).

    Returns batches of dicts: input_ids (B, N), attention_mask (B, N), labels (B,) or (B, N).

    Example:
        >>> from m2convert.loading import bundled_model_path                 # all-MiniLM-L6-v2, offline
        >>> tokenizer = transformers.AutoTokenizer.from_pretrained(bundled_model_path())
        >>> rows = ["label\\tsentence"] + [f"{i % 2}\\ta {'fine ' * (i + 1)}film" for i in range(12)]
        >>> _ = open("reviews.tsv", "w").write("\\n".join(rows) + "\\n")
        >>> from m2convert.data import load_data
        >>> src = load_data("reviews.tsv", tokenizer, batch_size=4)
        >>> sorted(src.batch(0))
        ['attention_mask', 'input_ids', 'labels', 'token_type_ids']
        >>> src.report.rows, src.report.bad
        (12, 0)
    """
    check_choice("task", task, ("auto", "classification", "lm"))
    check_choice("on_bad", on_bad, ON_BAD)
    if isinstance(data, (Batches, StreamBatches)):
        return data
    if isinstance(data, (str, Path)):
        path = Path(data)
        suffix = path.suffix.lower()
        if suffix in (".tsv", ".csv", ".jsonl", ".json"):
            _need(tokenizer, path)
            if suffix in (".tsv", ".csv"):
                texts, labels, report = read_tsv(path, text_column=text_column, label_column=label_column,
                                                 on_bad=on_bad)
            else:
                texts, labels, report = read_jsonl(path, text_key=text_column or "text",
                                                   label_key=label_column, on_bad=on_bad)
            return _from_texts(texts, labels, report, tokenizer, task, batch_size, max_length, block_size,
                               shuffle, seed, bucket)
        if task == "classification":
            raise ConfigError(f"{path}: plain text has no labels; use a .tsv or .jsonl file for classification")
        _need(tokenizer, path)
        blocks, report = pack_text(path, tokenizer, min(block_size, max_length), on_bad=on_bad)
        return Batches(list(blocks), lm_collate, batch_size, shuffle=shuffle, seed=seed, report=report)
    if hasattr(data, "column_names") and hasattr(data, "__getitem__") and hasattr(data, "__len__"):
        _need(tokenizer, "the dataset")
        report = RowReport(f"<{type(data).__name__}>")
        rows = [(i, data[i]) for i in range(len(data))]
        texts, labels, report = _rows_to_examples(rows, text_column or "text", label_column, report, on_bad)
        report.log()
        return _from_texts(texts, labels, report, tokenizer, task, batch_size, max_length, block_size,
                           shuffle, seed, bucket)
    if hasattr(data, "__iter__"):
        return StreamBatches(data, on_bad=on_bad)
    raise ConfigError(f"data of type {type(data).__name__} is not a path, dataset or iterable of batches")


def _need(tokenizer, what) -> None:
    if tokenizer is None:
        raise ConfigError(f"reading {what} needs the teacher's tokenizer; pass tokenizer=")


def _from_texts(texts, labels, report, tokenizer, task, batch_size, max_length, block_size, shuffle, seed,
                bucket=False):
    if task == "classification" and labels is None:
        raise DataError(f"{report.source}: task='classification' but the rows have no labels")
    if labels is not None and task != "lm":
        examples = tokenize_examples(texts, labels, tokenizer, max_length)
        return Batches(examples, classification_collate(tokenizer), batch_size, shuffle=shuffle, seed=seed,
                       report=report, bucket=bucket)
    ids: list[int] = []
    for t in texts:
        ids.extend(tokenizer(t, add_special_tokens=False)["input_ids"])
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
    blocks = _blocks(ids, min(block_size, max_length), report.source)
    return Batches(list(blocks), lm_collate, batch_size, shuffle=shuffle, seed=seed, report=report)
