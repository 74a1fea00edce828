"""One decode step of a recurrent converted decoder, exported with explicit states (m2.export_decode_step):
a fresh process with torch alone decodes from the prefill's states the tokens generate() gives."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
import transformers

import m2convert as m2
from m2convert.errors import ConfigError
from m2convert.export.decode import DecodeStep, decode_prefill, decode_step_program, state_names

pytestmark = pytest.mark.usefixtures("one_thread")
NEW_TOKENS = 64

# Greedy decoding from the saved prefill, in a process that imports torch and nothing of m2convert or
# transformers (checked at the end): argv = artifact, saved start, output file, "pt2" or "aoti".
DECODE = textwrap.dedent("""
    import sys
    import torch
    torch.set_num_threads(1)
    artifact, start, out, kind = sys.argv[1:5]
    saved = torch.load(start, weights_only=True)
    if kind == "pt2":
        step = torch.export.load(artifact).module()
    else:
        step = torch._inductor.aoti_load_package(artifact)
    position, states = saved["position"], list(saved["states"])
    token = saved["logits"].argmax(-1, keepdim=True)                      # (B, 1)
    tokens = [token]
    for _ in range(saved["new_tokens"] - 1):
        logits, *states = step(token, position, *states)
        token, position = logits[:, -1].argmax(-1, keepdim=True), position + 1
        tokens.append(token)
    loaded = sorted({m.split(".")[0] for m in sys.modules} & {"m2convert", "transformers"})
    assert not loaded, f"the runtime imported {loaded}"
    torch.save(torch.cat(tokens, dim=1), out)
""")


@pytest.fixture(scope="module")
def recurrent():
    """A tiny GPT-2 (weights large enough that greedy tokens vary), converted and made recurrent (S = 4)."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                                     initializer_range=0.3, bos_token_id=0, eos_token_id=0)
    converted = m2.convert(transformers.GPT2LMHeadModel(config).eval(), m2.ConvertConfig(filter_order=16))
    converted.generation_config.eos_token_id = None                    # always generate every requested token
    converted.generation_config.pad_token_id = 0
    return m2.to_recurrent(converted, state_size=4, horizon=128).model


@pytest.fixture(scope="module")
def prompt_and_tokens(recurrent):
    """(prompt (1, 9), the 64 tokens greedy generate() adds to it)."""
    ids = torch.randint(1, 96, (1, 9), generator=torch.Generator().manual_seed(3))
    tokens = recurrent.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)[:, ids.shape[1]:]
    assert len(set(tokens[0].tolist())) > 5                                # a sequence a wrong step would change
    return ids, tokens


def _decode_elsewhere(tmp_path, recurrent, prompt, artifact, kind: str) -> torch.Tensor:
    logits, position, states = decode_prefill(recurrent, prompt)
    torch.save({"logits": logits[:, -1], "position": position, "states": states, "new_tokens": NEW_TOKENS},
               tmp_path / "start.pt")
    script = tmp_path / "decode.py"
    script.write_text(DECODE)
    proc = subprocess.run([sys.executable, str(script), str(artifact), str(tmp_path / "start.pt"),
                           str(tmp_path / "tokens.pt"), kind], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(tmp_path / "tokens.pt", weights_only=True)


def test_the_exported_step_decodes_generates_tokens_with_torch_alone(tmp_path, recurrent, prompt_and_tokens):
    prompt, expected = prompt_and_tokens
    path = m2.export_decode_step(recurrent, tmp_path / "step.pt2")
    program = torch.export.load(str(path))
    names = [s.arg.name for s in program.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
    assert names == ["input_ids", "position", *state_names(recurrent)]
    assert torch.equal(_decode_elsewhere(tmp_path, recurrent, prompt, path, "pt2"), expected)


def test_the_aoti_package_decodes_generates_tokens_with_torch_alone(tmp_path, recurrent, prompt_and_tokens):
    prompt, expected = prompt_and_tokens
    path = m2.export_decode_step(recurrent, tmp_path / "step-aoti.pt2", aoti=True)   # compiles C++: a minute or more
    assert torch.equal(_decode_elsewhere(tmp_path, recurrent, prompt, path, "aoti"), expected)


def test_the_state_is_static_and_complex_modes_travel_as_real_pairs(recurrent):
    program = decode_step_program(recurrent, batch=2)
    inputs = {n.name: n.meta["val"] for n in program.graph.nodes if n.op == "placeholder"}
    assert tuple(inputs["input_ids"].shape) == (2, 1) and tuple(inputs["position"].shape) == (2,)
    assert tuple(inputs["layer1_modes"].shape) == (2, 32, 4, 2) and inputs["layer1_modes"].dtype == torch.float32
    assert tuple(inputs["layer0_z_tail"].shape) == (2, 96, 2)
    assert all(not isinstance(d, torch.SymInt) for v in inputs.values() if isinstance(v, torch.Tensor) for d in v.shape)
    outputs = [n for n in program.graph.nodes if n.op == "output"][0].args[0]
    assert [tuple(o.meta["val"].shape) for o in outputs][:2] == [(2, 1, 96), (2, 96, 2)]


def test_a_batch_with_left_padding_steps_like_generate(recurrent):
    ids = torch.randint(1, 96, (2, 7), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    expected = recurrent.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)[:, 7:]
    step = decode_step_program(recurrent, batch=2).module()
    logits, position, states = decode_prefill(recurrent, ids, mask)
    assert position.tolist() == [7, 4]
    tokens = [logits[:, -1].argmax(-1, keepdim=True)]
    for _ in range(11):
        logits, *states = step(tokens[-1], position, *states)
        position = position + 1
        tokens.append(logits[:, -1].argmax(-1, keepdim=True))
    assert torch.equal(torch.cat(tokens, dim=1), expected)


def test_a_llama_decoder_steps_like_generate():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=48, max_position_embeddings=64,
                                      initializer_range=0.3, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    converted = m2.convert(transformers.LlamaForCausalLM(config).eval(), m2.ConvertConfig(filter_order=16))
    converted.generation_config.eos_token_id = None
    recurrent = m2.to_recurrent(converted, state_size=4, horizon=128).model
    ids = torch.randint(1, 96, (1, 7), generator=torch.Generator().manual_seed(4))
    expected = recurrent.generate(ids, max_new_tokens=16, do_sample=False)[:, 7:]
    step = decode_step_program(recurrent).module()
    logits, position, states = decode_prefill(recurrent, ids)
    tokens = [logits[:, -1].argmax(-1, keepdim=True)]
    for _ in range(15):
        logits, *states = step(tokens[-1], position, *states)
        position = position + 1
        tokens.append(logits[:, -1].argmax(-1, keepdim=True))
    assert torch.equal(torch.cat(tokens, dim=1), expected)


def test_compiling_the_step_makes_one_graph_for_every_token(recurrent, prompt_and_tokens):
    prompt, expected = prompt_and_tokens
    graphs = []

    def count(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    step = torch.compile(DecodeStep(recurrent), fullgraph=True, backend=count)
    logits, position, states = decode_prefill(recurrent, prompt)
    tokens = [logits[:, -1].argmax(-1, keepdim=True)]
    with torch.no_grad():
        for _ in range(16):
            logits, *states = step(tokens[-1], position, *states)
            position = position + 1
            tokens.append(logits[:, -1].argmax(-1, keepdim=True))
    torch._dynamo.reset()
    assert len(graphs) == 1
    assert torch.equal(torch.cat(tokens, dim=1), expected[:, :17])


def test_models_without_a_recurrent_state_are_refused(recurrent, tmp_path):
    from conftest import _gpt2

    converted = m2.convert(_gpt2(), m2.ConvertConfig(filter_order=16))
    with pytest.raises(ConfigError, match="m2.to_recurrent"):
        m2.export_decode_step(converted, tmp_path / "x.pt2")
    kept = m2.convert(_gpt2(), m2.ConvertConfig(filter_order=16, overrides={r"h\.1\.attn": None}))
    with pytest.raises(ConfigError, match=r"keeps attention at \['transformer.h.1.attn'\]"):
        m2.export_decode_step(m2.to_recurrent(kept, state_size=4, horizon=128).model, tmp_path / "x.pt2")
    with pytest.raises(ConfigError, match="must end in .pt2"):
        m2.export_decode_step(recurrent, tmp_path / "x.so", aoti=True)
