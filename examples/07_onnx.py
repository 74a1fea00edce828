"""Export converted models to ONNX and run them with ONNX Runtime.

The bundled all-MiniLM-L6-v2 (an encoder) and a tiny GPT-2 built from a config (a decoder) are converted and
exported with ``m2convert.export.export_onnx`` (torch's dynamo exporter), the batch size and the sequence
length left dynamic. ONNX Runtime then runs each file at batch sizes and lengths other than the example's,
with padding, and the outputs are compared with the converted model's in PyTorch.

    python examples/07_onnx.py [--smoke]

Needs onnx, onnxscript and onnxruntime (``pip install onnx onnxscript onnxruntime``). ``--smoke`` compares
two input shapes instead of four.
"""

import argparse
import tempfile
from pathlib import Path

import onnxruntime
import torch
import transformers

import m2convert as m2
from m2convert.export import export_onnx

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--smoke", action="store_true", help="a tiny budget (a test runs this)")
args = parser.parse_args()
shapes = [(1, 9), (3, 40)] if args.smoke else [(1, 9), (3, 40), (8, 128), (2, 300)]
torch.manual_seed(0)
folder = Path(tempfile.mkdtemp())

# 1. The converted models: the bundled sentence encoder, and a decoder from a config (random weights).
encoder = m2.convert(m2.load_model("all-MiniLM-L6-v2")).eval()
decoder = m2.convert(transformers.GPT2LMHeadModel(transformers.GPT2Config(
    vocab_size=1000, n_embd=64, n_layer=2, n_head=4, n_positions=512, bos_token_id=0, eos_token_id=0)).eval())

for name, model, vocab in (("minilm-m2", encoder, 30000), ("gpt2-m2", decoder, 1000)):
    # 2. Export: example inputs of batch 2 (a batch of 1 would stay fixed at 1).
    ids = torch.randint(1, vocab, (2, 16))
    path = export_onnx(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, folder / f"{name}.onnx")
    session = onnxruntime.InferenceSession(str(path))
    print(f"{name}: wrote {path.name}, inputs {[i.name for i in session.get_inputs()]}")
    # 3. Other shapes, the first sequence padded: ONNX Runtime against PyTorch.
    worst = 0.0
    for batch, length in shapes:
        ids = torch.randint(1, vocab, (batch, length))
        mask = torch.ones_like(ids)
        mask[0, length // 2:] = 0
        with torch.no_grad():
            want = model(input_ids=ids, attention_mask=mask)[0]
        got = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
        real = mask.bool()
        worst = max(worst, (torch.from_numpy(got)[real] - want[real]).abs().max().item())
    print(f"{name}: ONNX Runtime vs PyTorch over {len(shapes)} shapes, max |diff| {worst:.2e}")
