"""The throughput benchmark on a tiny random BERT: row structure, positive numbers, failures reported."""

import json

import pytest
import torch
import transformers

from m2convert.bench import BenchRow, bench, extend_positions, position_limit
from m2convert.bench_report import ROW_KEYS


@pytest.fixture(scope="module")
def tiny_bert():
    config = transformers.BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=48)
    torch.manual_seed(0)
    return transformers.BertModel(config).eval()


@pytest.fixture(scope="module")
def result(tiny_bert):
    return bench(tiny_bert, seq_lens=[40, 16, 64], repeats=2, seconds_per_length=5, threads=1, name="tiny")


def test_rows_have_the_report_keys_and_positive_numbers(result):
    assert [r.seq_len for r in result.rows] == [16, 40, 64]
    for row in result.rows[:2]:
        assert row.original_status == row.eager_status == row.converted_status == "ok"
        for key in ("original_tokens_per_ms", "converted_tokens_per_ms", "eager_tokens_per_ms", "ratio",
                    "eager_ratio", "original_latency_ms", "converted_latency_ms"):
            assert getattr(row, key) > 0, key
        for key in ("original_peak_mb", "converted_peak_mb"):
            assert getattr(row, key) is None or getattr(row, key) >= 0
        assert 1 <= row.repeats <= 2
        # The plan's predicted peaks: the converted model's buffers alone are over 10 MiB.
        assert row.converted_predicted_mb > 10 and 0 <= row.original_predicted_mb < row.converted_predicted_mb
        latency = row.converted_latency_ms
        assert row.converted_tokens_per_ms == pytest.approx(row.seq_len / latency, rel=1e-2)


def test_past_the_position_table_the_original_fails_and_the_converted_runs(result):
    row = result.rows[-1]
    assert row.original_tokens_per_ms is None and row.ratio is None
    assert row.original_status == "past position limit (48)" and row.eager_status.startswith("past position")
    assert row.converted_status == "ok" and row.converted_tokens_per_ms > 0


def test_report_files(result, tmp_path):
    data = result.write(tmp_path, "throughput", extra={"monarch_linear": []}, notes=["a note"])
    on_disk = json.loads((tmp_path / "throughput.json").read_text())
    assert on_disk == json.loads(json.dumps(data))
    assert set(on_disk) >= {"models", "monarch_linear", "command", "date", "machine", "config"}
    rows = on_disk["models"]["tiny"]
    assert list(rows[0])[: len(ROW_KEYS)] == list(ROW_KEYS)
    md = (tmp_path / "throughput.md").read_text()
    assert "past position limit (48)" in md and "a note" in md
    assert sum(line.startswith("|") for line in result.table().splitlines()) == 2 + len(result.rows)


def test_row_sets_set_aside_leave_models_but_stay_in_the_markdown(result, tmp_path):
    from m2convert.bench_report import write_report
    data = write_report({"tiny": result, "extra": result}, tmp_path, "t", aside=("extra",))
    assert list(data["models"]) == ["tiny"] and list(data["other_models"]) == ["extra"]
    assert data["other_models"]["extra"] == data["models"]["tiny"]
    assert "## extra" in (tmp_path / "t.md").read_text()


def test_the_input_model_is_left_as_it_was(tiny_bert, result):
    assert position_limit(tiny_bert) == 48
    assert tiny_bert.config._attn_implementation == "sdpa"
    assert not any("M2" in type(m).__name__ for m in tiny_bert.modules())


def test_extend_positions_tiles_the_table(tiny_bert):
    import copy
    model = copy.deepcopy(tiny_bert)
    assert extend_positions(model, 100) and position_limit(model) == 100
    table = model.embeddings.position_embeddings.weight
    torch.testing.assert_close(table[48:96], table[:48])
    with torch.inference_mode():
        assert model(input_ids=torch.ones(1, 100, dtype=torch.long)).last_hidden_state.shape == (1, 100, 32)


def test_bad_arguments():
    from m2convert.errors import ConfigError
    with pytest.raises(ConfigError, match="dtype"):
        bench(torch.nn.Linear(2, 2), seq_lens=[8], dtype="int8")
    with pytest.raises(ConfigError, match="seq_lens"):
        bench(torch.nn.Linear(2, 2), seq_lens=[])
    assert BenchRow(seq_len=4).original_status == "ok"


def test_the_table_gives_rounds_threads_and_load_and_warns_when_busy(result, monkeypatch):
    import os

    from m2convert import bench_rows
    from m2convert.bench_rows import machine_load

    text = result.table()
    assert "interleaved rounds per length" in text and "cores busy before the run" in text
    cores = os.cpu_count() or 1
    monkeypatch.setattr(bench_rows, "busy_cores", lambda window=0.5: float(cores))
    busy = machine_load(1)
    assert busy["note"] and "rerun on a quiet machine" in busy["note"]
    monkeypatch.setattr(bench_rows, "busy_cores", lambda window=0.5: 0.1)
    assert machine_load(1)["note"] is None
    result.meta.update(machine_load(1, before=cores + 3.0))
    assert "warning: the machine was busy before the run" in result.table()


def test_busy_cores_sees_a_busy_neighbour():
    import subprocess
    import sys

    from m2convert.bench_rows import busy_cores

    spin = subprocess.Popen([sys.executable, "-c", "import time\nend = time.time() + 5\nwhile time.time() < end: pass"])
    try:
        time_to_start = busy_cores(0.5)                  # let it start spinning
        seen = busy_cores(1.0)
    finally:
        spin.kill()
        spin.wait()
    assert seen >= 0.7, (time_to_start, seen)
