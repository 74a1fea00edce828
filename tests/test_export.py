""".pt2 programs and AOTInductor packages of converted models run without m2convert; torch.compile has no
graph breaks."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

import m2convert as m2
from m2convert.errors import CaptureError, ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = m2.ConvertConfig(filter_order=16)
LENGTHS = (16, 37)                                       # the example length and another one, one artifact

# Runs in a fresh interpreter that cannot import m2convert (or transformers): torch alone runs the artifacts.
RUN_ARTIFACTS = textwrap.dedent("""
    import sys
    sys.modules["m2convert"] = None
    sys.modules["transformers"] = None
    import torch
    from safetensors.torch import load_file, save_file
    root = sys.argv[1]
    feeds, out = load_file(root + "/inputs.safetensors"), {}
    program = torch.export.load(root + "/bert.pt2").module()
    package = torch._inductor.aoti_load_package(root + "/bert-aoti.pt2")
    fused = torch._inductor.aoti_load_package(root + "/fused-aoti.pt2")
    for n in sys.argv[2:]:
        kwargs = {"input_ids": feeds["ids" + n], "attention_mask": feeds["mask" + n]}
        for name, run in (("pt2", program), ("aoti", package)):
            for i, t in enumerate(run(**kwargs)):
                out[f"{name}.{n}.{i}"] = t.contiguous()
        out[f"fused.{n}"] = fused(feeds["x" + n])[0]
    save_file(out, root + "/outputs.safetensors")
""")


class FusedOps(torch.nn.Module):
    """What a lowered model runs: the m2:: Monarch multiply and gated long convolution (with reverse taps)."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.w1 = torch.randn(4, 16, 8, generator=gen) / 8 ** 0.5               # unit-scale outputs
        self.w2 = torch.randn(4, 8, 16, generator=gen) / 16 ** 0.5
        self.k, self.k_rev = torch.randn(2, 32, 64, generator=gen) / 8
        self.D = torch.randn(32, generator=gen)

    def forward(self, x):                                                   # (B, N, 32)
        import m2convert.kernels.ops  # noqa: F401  (registers the m2:: ops)

        v = torch.ops.m2.monarch_matmul(x, self.w1, self.w2).transpose(1, 2)   # (B, 32, N)
        n = v.shape[-1]
        y = torch.ops.m2.gated_long_conv(v, v, v, self.k[:, :n], self.k_rev[:, :n], self.D)
        return y.transpose(1, 2)                                              # (B, N, 32)


def _inputs(n: int) -> dict:
    gen = torch.Generator().manual_seed(n)
    ids = torch.randint(1, 96, (2, n), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, n - 5:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture(scope="module")
def bert_artifacts(tmp_path_factory):
    """A converted tiny BERT exported once as .pt2 and once as an AOTInductor package (slow: compiles C++)."""
    from conftest import _bert

    model = m2.convert(_bert(layers=1), SMALL)
    root = tmp_path_factory.mktemp("export")
    example = _inputs(LENGTHS[0])
    m2.export(model, example, root / "bert.pt2")
    m2.export(model, example, root / "bert-aoti.pt2", aoti=True)
    m2.export(FusedOps(), (torch.randn(2, LENGTHS[0], 32),), root / "fused-aoti.pt2", aoti=True)
    return model, root


def test_pt2_and_aoti_package_run_in_a_fresh_process_without_m2convert(bert_artifacts):
    model, root = bert_artifacts
    feeds = {}
    for n in LENGTHS:
        feeds.update({f"ids{n}": _inputs(n)["input_ids"], f"mask{n}": _inputs(n)["attention_mask"],
                      f"x{n}": torch.randn(2, n, 32, generator=torch.Generator().manual_seed(n))})
    save_file(feeds, str(root / "inputs.safetensors"))
    proc = subprocess.run([sys.executable, "-I", "-c", RUN_ARTIFACTS, str(root), *map(str, LENGTHS)],
                          capture_output=True, text=True, timeout=300, cwd=str(root))
    assert proc.returncode == 0, proc.stderr[-3000:]
    outputs = load_file(str(root / "outputs.safetensors"))
    for n in LENGTHS:
        with torch.no_grad():
            expected = model(**_inputs(n)).to_tuple()                  # (last_hidden_state, pooler_output)
        for kind in ("pt2", "aoti"):
            got = [outputs[f"{kind}.{n}.{i}"] for i in range(len(expected))]
            assert got[0].shape == (2, n, 32)
            for a, b in zip(got, expected):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        # m2:: ops are compiled into the package: no m2convert needed to run a lowered model either.
        torch.testing.assert_close(outputs[f"fused.{n}"], FusedOps()(feeds[f"x{n}"]), rtol=1e-5, atol=1e-5)


def test_the_default_graph_holds_only_aten_ops(bert_artifacts):
    _, root = bert_artifacts
    program = torch.export.load(str(root / "bert.pt2"))
    targets = {n.target for n in program.graph.nodes if n.op == "call_function"}
    foreign = {t for t in targets if isinstance(t, torch._ops.OpOverload) and t.namespace != "aten"}
    assert not foreign


def test_torch_compile_fullgraph_has_no_graph_breaks(tiny_model):
    torch._dynamo.reset()
    model = m2.convert(tiny_model("bert"), SMALL)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")      # fullgraph: a break raises
    with torch.no_grad():
        torch.testing.assert_close(compiled(**_inputs(16))[0], model(**_inputs(16))[0], rtol=1e-5, atol=1e-5)


def test_bad_example_inputs_get_named_errors(tmp_path, tiny_model):
    model = m2.convert(tiny_model("bert"), SMALL)
    with pytest.raises(ConfigError, match="example_inputs"):
        m2.export(model, "input_ids", tmp_path / "a.pt2")
    with pytest.raises(ConfigError, match="dynamic_seq"):
        m2.export(model, {"input_ids": torch.tensor([1, 2, 3])}, tmp_path / "b.pt2")
    with pytest.raises(CaptureError, match="torch.export failed on BertModel"):
        m2.export(model, {"not_an_input": torch.ones(1, 4, dtype=torch.long)}, tmp_path / "c.pt2")


def test_cli_exports_a_saved_decoder_without_its_cache(tmp_path, tiny_model, capsys):
    from m2convert.cli import main

    model = m2.convert(tiny_model("gpt2"), SMALL)
    m2.save_pretrained(model, tmp_path / "gpt2-m2")
    assert main(["export", str(tmp_path / "gpt2-m2"), "--out", str(tmp_path / "gpt2.pt2")]) == 0
    program = torch.export.load(str(tmp_path / "gpt2.pt2")).module()
    for n in LENGTHS:
        ids = _inputs(n)["input_ids"][:1]
        (logits,) = program(input_ids=ids, attention_mask=torch.ones_like(ids))
        with torch.no_grad():
            torch.testing.assert_close(logits, model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    capsys.readouterr()
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "x.pt2")]) == 1
    assert "is not an m2convert save" in capsys.readouterr().err


@pytest.fixture(scope="module")
def vit():
    """A converted tiny ViT: 16 x 16 images of 4 x 4 patches."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                                 image_size=16, patch_size=4)
    return m2.convert(transformers.ViTModel(cfg).eval(), SMALL)


@pytest.fixture(scope="module")
def whisper():
    """A converted tiny WhisperModel: 8 mel bins x 16 frames in, decoder self-attention converted."""
    from conftest import _whisper

    model = _whisper()
    return m2.convert(model, SMALL, example_inputs=_whisper_inputs(8))


def _whisper_inputs(n: int) -> dict:
    gen = torch.Generator().manual_seed(n)
    return {"input_features": torch.randn(1, 8, 16, generator=gen),             # (B, mel bins, 2 * positions)
            "decoder_input_ids": torch.randint(1, 96, (1, n), generator=gen)}   # (B, N)


def _check_program(path, model, inputs: dict) -> dict:
    """Run the saved program on ``inputs`` against eager ``model``; return its dynamic dims per input."""
    from m2convert.export import dynamic_inputs

    program = torch.export.load(str(path))
    with torch.no_grad():
        expected = model(**inputs).to_tuple()
    got = program.module()(**inputs)
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    return dynamic_inputs(program)


def test_vision_and_audio_models_export_with_default_settings(tmp_path, vit, whisper):
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))   # (B, C, H, W)
    dims = _check_program(m2.export(vit, {"pixel_values": pixels}, tmp_path / "vit.pt2"), vit, {"pixel_values": pixels})
    assert dims == {"pixel_values": {}}          # a ViT's patch grid is fixed by its position table: H, W static

    path = m2.export(whisper, _whisper_inputs(8), tmp_path / "whisper.pt2")
    for n in (8, 13):                               # the decoder length stays dynamic; the frame count is fixed
        dims = _check_program(path, whisper, _whisper_inputs(n))
    assert dims["input_features"] == {} and list(dims["decoder_input_ids"]) == [1]


def test_cli_exports_saved_vision_and_audio_models(tmp_path, capsys, vit, whisper):
    from m2convert.cli import main

    m2.save_pretrained(vit, tmp_path / "vit-m2")
    m2.save_pretrained(whisper, tmp_path / "whisper-m2")
    assert main(["export", str(tmp_path / "vit-m2"), "--out", str(tmp_path / "vit.pt2")]) == 0    # inputs from config
    assert "pixel_values (1, 3, 16, 16)" in capsys.readouterr().err
    _check_program(tmp_path / "vit.pt2", vit, {"pixel_values": torch.randn(1, 3, 16, 16)})
    argv = ["export", str(tmp_path / "whisper-m2"), "--out", str(tmp_path / "whisper.pt2"),
            "--input", "input_features=1x8x16:float32", "--input", "decoder_input_ids=1x8:int64"]
    assert main(argv) == 0
    assert "input_features (1, 8, 16), decoder_input_ids (1, 2.." in capsys.readouterr().err
    for n in (8, 11):
        _check_program(tmp_path / "whisper.pt2", whisper, _whisper_inputs(n))
    assert main([*argv, "--static"]) == 0
    assert "decoder_input_ids (1, 8)" in capsys.readouterr().err
    assert _check_program(tmp_path / "whisper.pt2", whisper, _whisper_inputs(8))["decoder_input_ids"] == {}


def test_a_failed_export_leaves_the_inputs_unmarked_for_a_retry(tmp_path, vit):
    pixels = torch.randn(2, 3, 16, 16)                                                  # (B, C, H, W)
    channels = {"pixel_values": {1: torch.export.Dim.DYNAMIC}}                        # a ViT fixes C
    with pytest.raises(CaptureError, match="torch.export failed on ViTModel"):
        m2.export(vit, {"pixel_values": pixels}, tmp_path / "bad.pt2", dynamic_shapes=channels)
    assert not [k for k in vars(pixels) if k.startswith("_dynamo")]
    path = m2.export(vit, {"pixel_values": pixels}, tmp_path / "vit.pt2", dynamic_seq=False)    # the same tensor
    _check_program(path, vit, {"pixel_values": pixels})
    assert not [k for k in vars(pixels) if k.startswith("_dynamo")]


def test_cli_dynamic_batch_takes_any_batch_and_length(tmp_path, tiny_model):
    from m2convert.cli import main

    model = m2.convert(tiny_model("bert"), SMALL)
    m2.save_pretrained(model, tmp_path / "bert-m2")
    out = tmp_path / "bert.pt2"
    assert main(["export", str(tmp_path / "bert-m2"), "--out", str(out), "--dynamic-batch"]) == 0
    program = torch.export.load(str(out)).module()
    for b, n in ((1, 9), (3, 20)):
        ids = torch.randint(1, 90, (b, n))
        mask = torch.ones_like(ids)
        with torch.no_grad():
            want = model(input_ids=ids, attention_mask=mask).last_hidden_state
        got = program(input_ids=ids, attention_mask=mask)[0]
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    static = tmp_path / "static.pt2"
    assert main(["export", str(tmp_path / "bert-m2"), "--out", str(static)]) == 0
    with pytest.raises(Exception):
        torch.export.load(str(static)).module()(input_ids=torch.randint(1, 90, (3, 9)),
                                                 attention_mask=torch.ones(3, 9, dtype=torch.long))


def test_causal_monarch_export_says_why_the_length_is_fixed_and_static_works(tmp_path, tiny_model, capsys):
    from m2convert.cli import main

    model = m2.convert(tiny_model("gpt2"), m2.ConvertConfig(filter_order=16, causal_mode="causal-monarch"))
    m2.save_pretrained(model, tmp_path / "m")
    assert main(["export", str(tmp_path / "m"), "--out", str(tmp_path / "a.pt2")]) == 1
    err = capsys.readouterr().err
    assert "causal-monarch mixers build their Monarch DFT for one sequence length" in err
    assert "--static" in err and "--causal-mode causal" in err and "dynamic_seq" not in err
    assert main(["export", str(tmp_path / "m"), "--out", str(tmp_path / "b.pt2"), "--static"]) == 0
    ids = torch.randint(1, 90, (1, 16))
    (logits,) = torch.export.load(str(tmp_path / "b.pt2")).module()(input_ids=ids, attention_mask=torch.ones_like(ids))
    with torch.no_grad():
        torch.testing.assert_close(logits, model(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
