# Run from the repository root with the m2convert that wrote plan format version 1 (0.1.0, before typed
# site layouts). Kept so the saves can be told apart from ones written by later versions.
# Writes saves in plan format version 1 (untyped site layouts) for the backward-compatibility test.
import torch, transformers, m2convert as m2
from safetensors.torch import save_file
torch.manual_seed(0)
out = {}
bert = transformers.BertModel(transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)).eval()
gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=1, n_head=2,
        n_positions=64)).eval()
ids = torch.randint(0, 100, (2, 12))
mask = torch.ones_like(ids); mask[1, 9:] = 0
for name, model in (("bert", bert), ("gpt2", gpt2)):
    conv = m2.convert(model, m2.ConvertConfig(filter_order=8))
    m2.save_pretrained(conv, f"tests/data/plan_v1/{name}")
    with torch.no_grad():
        o = conv(input_ids=ids, attention_mask=mask)
    out[name] = (o.last_hidden_state if name == "bert" else o.logits).contiguous()
save_file({"input_ids": ids, "attention_mask": mask, **out}, "tests/data/plan_v1/expected.safetensors")
