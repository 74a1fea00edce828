"""m2convert.data: TSV / JSONL / text / dataset / iterable sources, bad rows, resumable order."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from m2convert.data import (Batches, StreamBatches, default_data_dir, load_data, pack_text, read_jsonl, read_tsv)
from m2convert.errors import ConfigError, DataError


class CharTokenizer:
    """A stand-in for a fast tokenizer: one id per character, [CLS]=1 ... [SEP]=2, pad 0."""

    pad_token_id, eos_token_id = 0, 3
    model_input_names = ["input_ids", "token_type_ids", "attention_mask"]

    def _ids(self, text, special, max_length=None):
        ids = [4 + (ord(c) % 60) for c in text]
        if special:
            ids = [1] + ids[: (max_length - 2) if max_length else None] + [2]
        return ids

    def __call__(self, text, add_special_tokens=True, truncation=False, max_length=None):
        if isinstance(text, list):
            return {"input_ids": [self._ids(t, add_special_tokens, max_length if truncation else None) for t in text]}
        return {"input_ids": self._ids(text, add_special_tokens, max_length if truncation else None)}


TOK = CharTokenizer()


def write(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def test_default_data_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("M2CONVERT_DATA", str(tmp_path))
    assert default_data_dir() == tmp_path
    monkeypatch.delenv("M2CONVERT_DATA")
    assert default_data_dir().parts[-2:] == ("shared", "data")


def test_tsv_bad_rows_are_counted_skipped_or_fatal(tmp_path):
    path = write(tmp_path / "t.tsv", "label\tsentence\n1\tgood one\nx\tbad label\n0\n1\t  \n0\tfine\n"
                 .encode() + b"1\t\xff\xfe broken\n")
    texts, labels, report = read_tsv(path)
    assert texts == ["good one", "fine"] and labels == [1, 0]
    assert report.rows == 2 and report.bad == 4
    assert [n for n, _ in report.examples] == [3, 4, 5, 7]
    assert "4 bad rows skipped" in report.summary() and "line 3" in report.summary()
    with pytest.raises(DataError, match=r"t\.tsv:3: label 'x' is not an integer"):
        read_tsv(path, on_bad="raise")
    # No label column: unlabelled rows (enough for transfer and kd); classification refuses them.
    assert read_tsv(write(tmp_path / "h.tsv", "y\tx\n1\ta\n"))[:2] == (["1"], None)
    assert read_tsv(tmp_path / "h.tsv", text_column="x")[:2] == (["a"], None)
    with pytest.raises(DataError, match="no labels"):
        load_data(tmp_path / "h.tsv", TOK, task="classification", batch_size=1)
    with pytest.raises(DataError, match="does not exist"):
        read_tsv(tmp_path / "missing.tsv")


def test_csv_rows_are_split_by_the_csv_rules(tmp_path):
    path = write(tmp_path / "r.csv", 'sentence,label\n"good, really good",1\nplain,0\n"said ""no""",1\n'.encode())
    texts, labels, report = read_tsv(path)
    assert texts == ["good, really good", "plain", 'said "no"'] and labels == [1, 0, 1] and report.bad == 0
    src = load_data(path, TOK, batch_size=3, max_length=8)
    assert src.batch(0)["labels"].tolist() in ([1, 0, 1], [0, 1, 1], [1, 1, 0])


def test_tsv_batches_are_padded_with_masks_and_labels(tmp_path):
    rows = "".join(f"{i % 2}\t{'ab' * (i + 1)}\n" for i in range(10))
    src = load_data(write(tmp_path / "d.tsv", "label\tcontent\n" + rows), TOK, batch_size=4, max_length=8)
    assert isinstance(src, Batches) and src.per_epoch == 2
    b = src.batch(0)
    assert set(b) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    assert b["input_ids"].shape == b["attention_mask"].shape and b["input_ids"].shape[1] <= 8
    lengths = b["attention_mask"].sum(1)
    assert all(b["input_ids"][i, n:].eq(0).all() and b["input_ids"][i, n - 1] == 2 for i, n in enumerate(lengths))
    assert b["labels"].shape == (4,)


def test_batch_order_is_deterministic_resumable_and_sharded(tmp_path):
    rows = "".join(f"{i % 2}\t{'x' * (1 + i % 7)}{i}\n" for i in range(40))
    path = write(tmp_path / "d.tsv", "label\ttext\n" + rows)
    a = load_data(path, TOK, batch_size=4, seed=5, bucket=True)
    b = load_data(path, TOK, batch_size=4, seed=5, bucket=True)
    late = [b.batch(k) for k in (13, 3)]                              # random access, any order
    assert torch.equal(late[0]["input_ids"], a.batch(13)["input_ids"])
    assert torch.equal(late[1]["input_ids"], a.batch(3)["input_ids"])
    seen = torch.cat([a.batch(k)["input_ids"][:, 1] for k in range(10)])  # one epoch covers every row once
    assert len(seen) == 40
    r0, r1 = a.shard(0, 2), a.shard(1, 2)
    assert torch.equal(r0.batch(1)["input_ids"], a.batch(2)["input_ids"])
    assert torch.equal(r1.batch(1)["input_ids"], a.batch(3)["input_ids"])
    padded = lambda src: sum(src.batch(k)["input_ids"].numel() for k in range(10))
    assert padded(a) <= padded(load_data(path, TOK, batch_size=4, seed=5))


def test_jsonl_rows_and_bad_lines(tmp_path):
    lines = [json.dumps({"text": "hello", "label": 1}), "{oops", json.dumps({"text": "", "label": 0}),
             json.dumps([1, 2]), json.dumps({"text": "world", "label": "zero"}), json.dumps({"text": "ok", "label": 0})]
    path = write(tmp_path / "d.jsonl", "\n".join(lines) + "\n")
    texts, labels, report = read_jsonl(path)
    assert texts == ["hello", "ok"] and labels == [1, 0] and report.bad == 4
    with pytest.raises(DataError, match=r"d\.jsonl:2: invalid JSON"):
        read_jsonl(path, on_bad="raise")
    unlabelled = write(tmp_path / "u.jsonl", "\n".join(json.dumps({"text": "abc" * 10}) for _ in range(4)))
    src = load_data(unlabelled, TOK, batch_size=2, block_size=16)
    b = src.batch(0)
    assert b["input_ids"].shape == (2, 16) and torch.equal(b["labels"], b["input_ids"])
    with pytest.raises(DataError, match="no labels"):
        load_data(unlabelled, TOK, task="classification")


def test_plain_text_is_packed_into_blocks(tmp_path):
    path = write(tmp_path / "w.txt", "line one\n".encode() + b"\xff bad\n" + ("more text here\n" * 20).encode())
    blocks, report = pack_text(path, TOK, 16)
    assert blocks.shape[1] == 16 and blocks.shape[0] == (9 + 15 * 20) // 16 and report.bad == 1
    with pytest.raises(DataError, match=r"w\.txt:2: not valid UTF-8"):
        pack_text(path, TOK, 16, on_bad="raise")
    src = load_data(path, TOK, batch_size=3, block_size=16)
    assert src.batch(0)["input_ids"].shape == (3, 16)
    with pytest.raises(DataError, match="do not fill one block"):
        pack_text(write(tmp_path / "s.txt", "hi\n"), TOK, 16)


def test_dataset_like_objects_are_read_as_rows():
    class Dataset:
        column_names = ["text", "label"]
        rows = [{"text": "good", "label": 1}, {"text": None, "label": 0}, {"text": "bad", "label": 0},
                {"text": "fine", "label": 1}]

        def __len__(self):
            return len(self.rows)

        def __getitem__(self, i):
            return self.rows[i]

    src = load_data(Dataset(), TOK, batch_size=3, shuffle=False)
    assert src.report.bad == 1 and src.batch(0)["labels"].tolist() == [1, 0, 1]


def test_stream_batches_skip_bad_batches_and_resume_by_reading():
    good = [{"input_ids": torch.full((2, 3), i)} for i in range(4)]
    items = [good[0], "junk", good[1], {"input_ids": [1, 2]}, good[2], good[3]]
    src = load_data(items, on_bad="skip")
    assert isinstance(src, StreamBatches)
    assert [src.batch(k)["input_ids"][0, 0].item() for k in range(6)] == [0, 1, 2, 3, 0, 1]  # cycles
    assert src.report.bad == 3                                       # junk, the list, junk again
    resumed = load_data(items)
    assert resumed.batch(3)["input_ids"][0, 0].item() == 3
    with pytest.raises(DataError, match="already read"):
        resumed.batch(1)
    with pytest.raises(DataError, match="not a dict of tensors"):
        load_data(items, on_bad="raise").batch(1)
    with pytest.raises(DataError, match="ran out after 2 batches"):
        one_shot = load_data(iter(good[:2]))
        [one_shot.batch(k) for k in range(3)]


def test_files_need_a_tokenizer_and_odd_data_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match="tokenizer"):
        load_data(write(tmp_path / "a.tsv", "label\ttext\n1\tx\n"))
    with pytest.raises(ConfigError, match="not a path, dataset or iterable"):
        load_data(42)
    with pytest.raises(ConfigError, match="on_bad"):
        load_data([], on_bad="ignore")


@pytest.mark.skipif(not (default_data_dir() / "sst2" / "dev.tsv").exists(), reason="shared data folder absent")
def test_real_sst2_dev_reads_cleanly():
    texts, labels, report = read_tsv(default_data_dir() / "sst2" / "dev.tsv", on_bad="raise")
    assert len(texts) == 872 and report.bad == 0 and set(labels) == {0, 1}
