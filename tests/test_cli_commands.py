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


WHISPER_INPUTS = ["--input", "input_features=1x8x16:float32", "--input", "decoder_input_ids=1x8:int64"]


def _tiny_whisper_dir(tmp_path):
    from conftest import _whisper

    path = tmp_path / "whisper"
    _whisper().save_pretrained(path)
    return path


def test_whisper_converts_from_the_cli_with_described_inputs(tmp_path, capsys):
    import m2convert as m2

    whisper = _tiny_whisper_dir(tmp_path)
    out = tmp_path / "whisper-m2"
    assert main(["convert", str(whisper), "--out", str(out), "--filter-order", "8", *WHISPER_INPUTS]) == 0
    sites = json.loads((out / "m2convert.json").read_text())["plan"]["sites"]
    assert {s["fqn"]: s["status"] for s in sites if s["kind"] == "sequence"} == {
        "encoder.layers.0.self_attn": "convert", "decoder.layers.0.self_attn": "convert",
        "decoder.layers.0.encoder_attn": "skip"}
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "1 of 5 sites were left unconverted (cross-attention: 1 site" in warnings[0]
    converted = m2.from_pretrained(out)
    feats, ids = torch.randn(1, 8, 16), torch.randint(0, 96, (1, 5))                # (B, mel, T), (B, N)
    with torch.no_grad():
        assert converted(input_features=feats, decoder_input_ids=ids).last_hidden_state.shape == (1, 5, 32)


def test_a_safetensors_file_of_inputs_plans_like_the_described_ones(tmp_path, capsys):
    from safetensors.torch import save_file

    whisper = _tiny_whisper_dir(tmp_path)
    file = tmp_path / "inputs.safetensors"
    save_file({"input_features": torch.randn(1, 8, 16), "decoder_input_ids": torch.randint(0, 96, (1, 12))}, str(file))
    assert main(["plan", str(whisper), "--json", "--inputs", str(file)]) == 0
    from_file = json.loads(capsys.readouterr().out)
    assert main(["plan", str(whisper), "--json", *WHISPER_INPUTS]) == 0
    described = json.loads(capsys.readouterr().out)
    assert [s["status"] for s in from_file["sites"]] == ["convert", "convert", "convert", "skip", "convert"]
    assert [(s["fqn"], s["status"]) for s in from_file["sites"]] == \
        [(s["fqn"], s["status"]) for s in described["sites"]]
    # --input adds to the file's tensors; without input_features the model cannot run
    save_file({"decoder_input_ids": torch.randint(0, 96, (1, 12))}, str(file))
    assert main(["plan", str(whisper), "--inputs", str(file)]) == 1
    assert "give --input NAME=SHAPE:DTYPE" in capsys.readouterr().err
    assert main(["plan", str(whisper), "--inputs", str(file), "--input", "input_features=1x8x16:float32"]) == 0


def test_distill_default_stages_fit_the_model_and_data(tmp_path):
    teacher = _tiny_bert_dir(tmp_path)
    base = tmp_path / "base"
    transformers.BertModel.from_pretrained(teacher).save_pretrained(base)        # no task head
    transformers.AutoTokenizer.from_pretrained(teacher).save_pretrained(base)
    data = tmp_path / "train.tsv"
    data.write_text("label\tsentence\n" + "".join(f"{i % 2}\tw{i} w{i + 1} w{i + 2}\n" for i in range(40)))
    text = tmp_path / "train.txt"
    text.write_text("".join(f"w{i} w{i + 1} w{i + 2} w{i + 3}\n" for i in range(60)))
    common = ["--steps", "2", "--batch-size", "8", "--block-size", "16", "--no-progress"]
    runs = {"head-tsv": (teacher, data, ["transfer", "kd", "task"]), "base-tsv": (base, data, ["transfer", "kd"]),
            "head-text": (teacher, text, ["transfer", "kd"])}
    for name, (model, source, stages) in runs.items():
        assert main(["convert", str(model), "--out", str(tmp_path / f"s-{name}"), "--filter-order", "8"]) == 0
        assert main(["distill", "--teacher", str(model), "--student", str(tmp_path / f"s-{name}"), "--data",
                     str(source), "--out", str(tmp_path / f"r-{name}"), *common]) == 0, name
        result = json.loads((tmp_path / f"r-{name}" / "distill_result.json").read_text())
        assert [s["name"] for s in result["stages"]] == stages, name
    # Naming task where it cannot run fails before any training, and says what to use instead.
    assert main(["distill", "--teacher", str(base), "--student", str(tmp_path / "s-base-tsv"), "--data", str(data),
                 "--out", str(tmp_path / "r-bad"), "--stages", "transfer,task", *common]) == 1
    assert not (tmp_path / "r-bad").exists()


def test_distill_reads_csv_unlabelled_rows_and_checks_out_first(tmp_path, capsys, monkeypatch):
    from m2convert import api

    teacher = _tiny_bert_dir(tmp_path)
    assert main(["convert", str(teacher), "--out", str(tmp_path / "s"), "--filter-order", "8"]) == 0
    common = ["--teacher", str(teacher), "--student", str(tmp_path / "s"), "--steps", "2", "--batch-size", "4",
              "--no-progress"]
    csv_file = tmp_path / "train.csv"
    csv_file.write_text("sentence,label\n" + "".join(f'"w{i}, w{i + 1}",{i % 2}\n' for i in range(16)))
    assert main(["distill", *common, "--data", str(csv_file), "--out", str(tmp_path / "r1")]) == 0
    result = json.loads((tmp_path / "r1" / "distill_result.json").read_text())
    assert [s["name"] for s in result["stages"]] == ["transfer", "kd", "task"]
    assert result["data_report"]["rows"] == 16 and result["data_report"]["bad"] == 0   # the header is no row
    plain = tmp_path / "plain.tsv"
    plain.write_text("text\n" + "".join(f"w{i} w{i + 1} w{i + 2} w{i + 3} w{i + 4}\n" for i in range(40)))
    assert main(["distill", *common, "--data", str(plain), "--out", str(tmp_path / "r2"), "--block-size", "8"]) == 0
    result = json.loads((tmp_path / "r2" / "distill_result.json").read_text())
    assert [s["name"] for s in result["stages"]] == ["transfer", "kd"]
    capsys.readouterr()
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("w1 w2\n")
    assert main(["distill", *common, "--data", str(tiny), "--out", str(tmp_path / "r3")]) == 1
    assert "--block-size" in capsys.readouterr().err
    loads = []
    monkeypatch.setattr(api, "load_model", lambda name: loads.append(name))
    (tmp_path / "taken").write_text("x")
    assert main(["distill", *common, "--data", str(plain), "--out", str(tmp_path / "taken")]) == 1
    assert "is a file" in capsys.readouterr().err and not loads
