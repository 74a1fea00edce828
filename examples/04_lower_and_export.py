"""Lower a converted model onto the fused ``m2::`` kernels, export it, and run the files without m2convert.

A tiny BERT built from a config is converted (the bundled all-MiniLM-L6-v2 goes the same way, only its
AOTInductor compile takes longer). ``m2.lower`` rewrites the Monarch multiplies and long convolutions of
its torch.export graph into ``m2::monarch_matmul`` and ``m2::gated_long_conv``; the lowered module takes
the model's arguments and returns the same outputs. Then three files:

    bert-m2.pt2             m2.export(converted): a torch.export program of the reference ops; torch alone runs it
    bert-m2-fused.pt2       m2.export(lowered): the same with the fused ops; it calls them, so loading it needs
                            them registered: ``import m2convert.kernels.ops`` first
    bert-m2-fused-aoti.pt2  m2.export(lowered, aoti=True): AOTInductor-compiled C++ with the fused ops compiled
                            in; torch alone runs it (it expects contiguous inputs)

Each is run in a fresh Python process, the first and last where ``import m2convert`` fails, and compared
with the eager converted model. Every file takes any sequence length N up to the position table (128).

    python examples/04_lower_and_export.py [--out DIR] [--smoke]

``--smoke`` skips the AOTInductor package (compiling it takes a minute or more on a CPU).
"""

import argparse
import subprocess
import sys
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file

import m2convert as m2

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--out", type=Path, default=Path("bert-m2-export"), help="folder for the files")
parser.add_argument("--smoke", action="store_true", help="no AOTInductor compile (a test runs this)")
args = parser.parse_args()
args.out.mkdir(parents=True, exist_ok=True)
torch.manual_seed(0)

# 1. A converted encoder: 2 layers, H = 64, positions up to 128.
config = transformers.BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=128, max_position_embeddings=128)
converted = m2.convert(transformers.BertModel(config).eval(), m2.ConvertConfig(filter_order=32))

# 2. Lower: 4 Monarch multiplies (two per MLP) and 4 long convolutions (each mixer's filter and residual
#    filter, with their gates) become m2:: ops.
lowered = m2.lower(converted)
print(lowered.result)
ids = torch.randint(0, 1000, (2, 40))                                         # (B, N)
mask = torch.ones_like(ids)
mask[1, 30:] = 0                                                              # the second row is padded
with torch.no_grad():
    want = converted(input_ids=ids, attention_mask=mask).last_hidden_state    # (B, N, H) = (2, 40, 64)
    fused = lowered(input_ids=ids, attention_mask=mask).last_hidden_state
    alone = lowered(input_ids=ids).last_hidden_state                          # no mask: as the model does
print(f"lowered vs eager: max |diff| {(fused - want).abs().max():.2e}; without a mask "
      f"{(alone - converted(input_ids=ids).last_hidden_state).abs().max():.2e}")

# 3. Export on example inputs of length 16; the sequence dimension stays dynamic.
example = {"input_ids": torch.randint(0, 1000, (2, 16)), "attention_mask": torch.ones(2, 16, dtype=torch.long)}
m2.export(converted, example, args.out / "bert-m2.pt2")
m2.export(lowered, example, args.out / "bert-m2-fused.pt2")
if not args.smoke:
    m2.export(lowered, example, args.out / "bert-m2-fused-aoti.pt2", aoti=True)
save_file({"input_ids": ids, "attention_mask": mask, "want": want.contiguous()}, str(args.out / "check.safetensors"))

# 4. Run each file in a fresh process and compare with the eager output (B, N, H).
RUN = """
import sys
from pathlib import Path
NO_M2CONVERT = sys.argv[2] == "without"
if NO_M2CONVERT:
    sys.modules["m2convert"] = None                # `import m2convert` fails from here on
else:
    import m2convert.kernels.ops                   # registers the m2:: ops the fused program calls
import torch
from safetensors.torch import load_file

file = Path(sys.argv[1])
feed = load_file(str(file.parent / "check.safetensors"))
want = feed.pop("want")
if file.name.endswith("-aoti.pt2"):
    run = torch._inductor.aoti_load_package(str(file))
else:
    run = torch.export.load(str(file)).module()
with torch.no_grad():
    out = run(**feed)
got = out[0]                                       # a flat tuple: (last_hidden_state, pooler_output)
print(f"{file.name}: ran {'without' if NO_M2CONVERT else 'with'} m2convert, max |diff| {(got - want).abs().max():.2e}")
"""
runs = [("bert-m2.pt2", "without"), ("bert-m2-fused.pt2", "with")]
runs += [] if args.smoke else [("bert-m2-fused-aoti.pt2", "without")]
for name, how in runs:
    subprocess.run([sys.executable, "-c", RUN, str(args.out / name), how], check=True)
