"""Readers of recovery data files: GLUE TSV, JSONL and plain text (packed into blocks), with
bad-row accounting (:class:`RowReport`). See :mod:`m2convert.data` for the overview."""

from __future__ import annotations

import csv

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import DataError, check_choice, check_int

log = logging.getLogger("m2convert.data")
ON_BAD = ("skip", "raise")


def default_data_dir() -> Path:
    """The shared data folder of the full benchmarks: ``$M2CONVERT_DATA`` or ``../shared/data`` beside the
    repository root (the demo and the examples read :func:`sample_data_dir` instead).

    Example:
        >>> (default_data_dir() / "sst2" / "dev.tsv").name
        'dev.tsv'
    """
    env = os.environ.get("M2CONVERT_DATA")
    if env:
        return Path(env).expanduser()
    return Path(__file__).resolve().parents[2].parent / "shared" / "data"        # beside the repository


def sample_data_dir() -> Path:
    """The sample text installed with the package, which the demo and ``examples/`` read: WikiText-2
    sentences, one a line (CC BY-SA 3.0; its README.md gives the source and how they were made).

    Example:
        >>> sorted(p.name for p in sample_data_dir().glob("*.txt"))     # train on valid, measure on test
        ['wikitext2-test-sentences.txt', 'wikitext2-valid-sentences.txt']
    """
    return Path(__file__).resolve().parent / "sample"


@dataclass
class RowReport:
    """What reading a source found: rows kept, bad rows and the first few reasons (line, why).

    Example:
        >>> report = RowReport("train.tsv", rows=2)
        >>> report.add_bad(3, "empty text", on_bad="skip")
        >>> report.summary()
        'train.tsv: 2 rows kept, 1 bad rows skipped; e.g. line 3: empty text'
    """

    source: str
    rows: int = 0
    bad: int = 0
    examples: list[tuple[int, str]] = field(default_factory=list)

    def add_bad(self, line: int, why: str, on_bad: str) -> None:
        if on_bad == "raise":
            raise DataError(f"{self.source}:{line}: {why} (pass on_bad='skip' to skip bad rows)")
        self.bad += 1
        if len(self.examples) < 5:
            self.examples.append((line, why))

    def summary(self) -> str:
        text = f"{self.source}: {self.rows} rows kept, {self.bad} bad rows skipped"
        if self.examples:
            text += "; e.g. " + "; ".join(f"line {n}: {why}" for n, why in self.examples)
        return text

    def to_dict(self) -> dict:
        return {"source": self.source, "rows": self.rows, "bad": self.bad,
                "examples": [list(e) for e in self.examples]}

    def log(self) -> None:
        (log.warning if self.bad else log.info)(self.summary())


def _label(value, where: str) -> int:
    try:
        return int(str(value).strip())
    except ValueError:
        raise DataError(f"{where}: label {value!r} is not an integer") from None


def read_tsv(path, *, text_column: str | None = None, label_column: str = "label",
             on_bad: str = "skip") -> tuple[list[str], list[int] | None, RowReport]:
    """Read a GLUE-style TSV, or a ``.csv`` file (header line; a text column and, optionally, a label column).

    The text column is ``text_column`` or the first non-label column; without a ``label_column`` in the
    header the rows are unlabelled (labels None). A ``.csv`` is split by the csv module (quoted fields,
    commas inside quotes; one line per row). Returns (texts, labels or None, report).

    Example:
        >>> rows = ["label\\tsentence"] + [f"{i % 2}\\ta {'fine ' * (i + 1)}film" for i in range(12)]
        >>> _ = open("reviews.tsv", "w").write("\\n".join(rows) + "\\n")
        >>> texts, labels, report = read_tsv("reviews.tsv")
        >>> len(texts), labels[:3], report.bad
        (12, [0, 1, 0], 0)
    """
    check_choice("on_bad", on_bad, ON_BAD)
    path = Path(path)
    report = RowReport(str(path))
    texts, labels = [], []
    with _open(path) as f:
        split = _csv_fields if path.suffix.lower() == ".csv" else _tsv_fields
        first = _decode(f.readline(), 1, report, "raise")
        header = split(first)
        li = header.index(label_column) if label_column in header else None
        if text_column is None:
            others = [i for i in range(len(header)) if i != li]
            if not others:
                raise DataError(f"{path}: header {header} has no text column")
            ti = others[0]
        elif text_column in header:
            ti = header.index(text_column)
        else:
            raise DataError(f"{path}: header {header} has no {text_column!r} column")
        for n, line in _lines(f, report, on_bad, start=2):
            parts = split(line)
            if len(parts) != len(header):
                report.add_bad(n, f"{len(parts)} fields, expected {len(header)}", on_bad)
                continue
            try:
                label = None if li is None else _label(parts[li], f"{path}:{n}")
            except DataError as e:
                report.add_bad(n, str(e).split(": ", 1)[1], on_bad)
                continue
            if not parts[ti].strip():
                report.add_bad(n, "empty text", on_bad)
                continue
            texts.append(parts[ti])
            labels.append(label)
    report.rows = len(texts)
    report.log()
    return texts, labels if li is not None else None, report


def header_fields(path) -> list[str]:
    """The header fields of a TSV or ``.csv`` file, split as :func:`read_tsv` splits them ([] when unreadable)."""
    path = Path(path)
    split = _csv_fields if path.suffix.lower() == ".csv" else _tsv_fields
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return [c.strip() for c in split(f.readline())]
    except OSError:
        return []


def _tsv_fields(line: str) -> list[str]:
    return line.rstrip("\r\n").split("\t")


def _csv_fields(line: str) -> list[str]:
    return next(csv.reader([line.rstrip("\r\n")]), [])


def read_jsonl(path, *, text_key: str = "text", label_key: str | None = "label",
               on_bad: str = "skip") -> tuple[list[str], list[int] | None, RowReport]:
    """Read JSON lines ``{"text": ..., "label": ...}``; labels are None when no row has one.

    Example:
        >>> _ = Path("train.jsonl").write_text('{"text": "a fine film", "label": 1}\\n{"text": ""}\\n')
        >>> texts, labels, report = read_jsonl("train.jsonl")
        >>> texts, labels, report.bad
        (['a fine film'], [1], 1)
    """
    check_choice("on_bad", on_bad, ON_BAD)
    path = Path(path)
    report = RowReport(str(path))
    rows = []
    with _open(path) as f:
        for n, line in _lines(f, report, on_bad):
            if not line.strip():
                continue
            try:
                rows.append((n, json.loads(line)))
            except json.JSONDecodeError as e:
                report.add_bad(n, f"invalid JSON ({e.msg})", on_bad)
    texts, labels, report = _rows_to_examples(rows, text_key, label_key, report, on_bad)
    report.log()
    return texts, labels, report


def _rows_to_examples(rows, text_key, label_key, report, on_bad):
    has_labels = label_key is not None and any(isinstance(r, dict) and label_key in r for _, r in rows)
    texts, labels = [], []
    for n, row in rows:
        if not isinstance(row, dict):
            report.add_bad(n, f"row is a {type(row).__name__}, expected an object", on_bad)
            continue
        text = row.get(text_key)
        if not isinstance(text, str) or not text.strip():
            report.add_bad(n, f"missing or empty {text_key!r}", on_bad)
            continue
        if has_labels:
            try:
                labels.append(_label(row[label_key], f"row {n}"))
            except (KeyError, DataError):
                report.add_bad(n, f"missing or non-integer {label_key!r}", on_bad)
                continue
        texts.append(text)
    report.rows = len(texts)
    return texts, (labels if has_labels else None), report


def _open(path: Path):
    if not path.is_file():
        raise DataError(f"data file {path} does not exist (data folder: set M2CONVERT_DATA or pass a path)")
    return open(path, "rb")


def _decode(raw: bytes, n: int, report: RowReport, on_bad: str) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        report.add_bad(n, "not valid UTF-8", on_bad)
        return None


def _lines(f, report: RowReport, on_bad: str, start: int = 1):
    """(line number, text) of an open binary file's lines that decode as UTF-8 (the others are reported)."""
    for n, raw in enumerate(f, start=start):
        line = _decode(raw, n, report, on_bad)
        if line is not None:
            yield n, line


def pack_text(path, tokenizer, block_size: int, *, on_bad: str = "skip") -> tuple[torch.Tensor, RowReport]:
    """Tokenise a plain-text file (no special tokens) and pack it into (num_blocks, block_size) ids.

    The tail that does not fill a block is dropped.

    Example:
        >>> from m2convert.loading import bundled_model_path                 # all-MiniLM-L6-v2, offline
        >>> tokenizer = transformers.AutoTokenizer.from_pretrained(bundled_model_path())
        >>> _ = Path("notes.txt").write_text("the cat sat on the mat.\\n" * 10)
        >>> blocks, report = pack_text("notes.txt", tokenizer, 16)          # 70 tokens -> 4 blocks of 16
        >>> blocks.shape
        torch.Size([4, 16])
    """
    check_int("block_size", block_size, low=2)
    path = Path(path)
    report = RowReport(str(path))
    with _open(path) as f:
        lines = [line for _, line in _lines(f, report, on_bad)]
    report.rows = len(lines)
    report.log()
    ids: list[int] = []
    for start in range(0, len(lines), 2000):
        ids.extend(tokenizer("".join(lines[start:start + 2000]), add_special_tokens=False)["input_ids"])
    return _blocks(ids, block_size, str(path)), report


def _blocks(ids: list[int], block_size: int, source: str) -> torch.Tensor:
    n = len(ids) // block_size                                          # the tail is dropped
    if n == 0:
        raise DataError(f"{source}: {len(ids)} tokens do not fill one block of {block_size}; give more text or "
                        "a smaller block_size=")
    return torch.tensor(ids[: n * block_size], dtype=torch.long).view(n, block_size)   # (n, block)
