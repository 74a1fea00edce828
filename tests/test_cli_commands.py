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
