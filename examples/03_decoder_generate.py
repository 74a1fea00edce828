"""Convert a decoder and generate with it.

A tiny GPT-2 built from a config (random weights, so the tokens mean nothing) is converted: its causal
attention becomes causal M2 sequence mixers (FFT long convolutions), its MLPs Monarch matrices. The
converted model is still a ``GPT2LMHeadModel``, so ``generate()`` works as before; a decoding cache keeps
each mixer's state, and sampling with the same seed gives the same tokens with and without it. A pretrained decoder
(``GPT2LMHeadModel.from_pretrained("gpt2")``) converts the same way and then needs recovery
(``02_recover_on_sample.py``).

    python examples/03_decoder_generate.py [--smoke]

``--smoke`` generates 8 new tokens instead of 48.
"""

import argparse
import time

import torch
import transformers

import m2convert as m2

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--smoke", action="store_true", help="a tiny budget (a test runs this)")
args = parser.parse_args()
new_tokens = 8 if args.smoke else 48
torch.manual_seed(0)

# 1. A decoder: 2 layers, H = 64, 4 heads, room for 128 positions.
config = transformers.GPT2Config(vocab_size=1000, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                 bos_token_id=0, eos_token_id=0)
model = transformers.GPT2LMHeadModel(config).eval()

# 2. Convert: the plan finds causal attention in the graph and picks causal mixers.
plan = m2.plan(model, m2.ConvertConfig(filter_order=32))
print(plan)
converted = plan.apply()
print(f"converted: {type(converted).__name__}")

# 3. Generate: a batch of 2 prompts of 12 tokens, sampled, with and without the decoding cache.
prompt = torch.randint(0, 1000, (2, 12))                                          # (B, N)
settings = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=True, top_k=50, pad_token_id=0)
runs = {}
for use_cache in (True, False):
    torch.manual_seed(1)
    start = time.perf_counter()
    runs[use_cache] = converted.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                                         use_cache=use_cache, **settings)                 # (B, N + new)
    print(f"use_cache={use_cache}: {time.perf_counter() - start:.2f}s")
print("generated:", runs[True][0, 12:].tolist())
print("same tokens with and without the cache:", torch.equal(runs[True], runs[False]))
