"""The distill and bench subcommands end to end on a tiny BERT saved to disk."""

import json

import torch
import transformers

from m2convert.cli import main


def _tiny_bert_dir(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=128, num_labels=2)
    model = transformers.BertForSequenceClassification(cfg).eval()
    path = tmp_path / "teacher"
    model.save_pretrained(path)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(115)]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    transformers.BertTokenizer(str(tmp_path / "vocab.txt")).save_pretrained(path)
    return path


def test_convert_then_distill_writes_a_recovered_model(tmp_path, capsys):
    teacher = _tiny_bert_dir(tmp_path)
    data = tmp_path / "train.tsv"
    data.write_text("label\tsentence\n" + "".join(f"{i % 2}\tw{i} w{i + 1} w{i + 2}\n" for i in range(40)))
    assert main(["convert", str(teacher), "--out", str(tmp_path / "student"), "--filter-order", "8"]) == 0
    code = main(["distill", "--teacher", str(teacher), "--student", str(tmp_path / "student"), "--data", str(data),
                 "--out", str(tmp_path / "recovered"), "--stages", "transfer", "--steps", "3", "--batch-size", "8"])
    assert code == 0
    result = json.loads((tmp_path / "recovered" / "distill_result.json").read_text())
    assert [s["name"] for s in result["stages"]] == ["transfer"] and result["stages"][0]["steps"] == 3
    assert (tmp_path / "recovered" / "m2convert.json").exists()


def test_bench_prints_rows_and_writes_reports(tmp_path, capsys):
    teacher = _tiny_bert_dir(tmp_path)
    code = main(["bench", str(teacher), "--seq-lens", "16,32", "--out", str(tmp_path / "report")])
    assert code == 0
    out = capsys.readouterr().out
    assert "16" in out and "32" in out
    written = list((tmp_path / "report").glob("*.json"))
    assert written and json.loads(written[0].read_text())


def test_bench_takes_conversion_settings_and_a_converted_dir(tmp_path, capsys):
    teacher = _tiny_bert_dir(tmp_path)
    code = main(["bench", str(teacher), "--seq-lens", "16", "--nblocks", "2", "--projection-nblocks", "2",
                 "--filter-order", "8", "--out", str(tmp_path / "a")])
    assert code == 0
    (meta,) = json.loads(next((tmp_path / "a").glob("*.json")).read_text())["config"].values()
    assert meta["config"]["nblocks"] == 2 and meta["config"]["projection_nblocks"] == 2, meta
    assert main(["convert", str(teacher), "--out", str(tmp_path / "student"), "--filter-order", "8"]) == 0
    code = main(["bench", str(teacher), "--seq-lens", "16", "--converted", str(tmp_path / "student"),
                 "--out", str(tmp_path / "b")])
    assert code == 0
    rows = json.loads(next((tmp_path / "b").glob("*.json")).read_text())["models"]
    (row,) = next(iter(rows.values()))
    assert row["seq_len"] == 16 and row["converted_tokens_per_ms"] > 0
    assert main(["bench", str(teacher), "--seq-lens", "16", "--nblocks", "0"]) == 1     # ConfigError, one line
    assert "nblocks" in capsys.readouterr().err
