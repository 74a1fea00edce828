"""A saved converted model loads converted, bit-equal to the model that was saved, through transformers'
Auto classes, pipeline, SentenceTransformer and lm-eval's HFLM under ``trust_remote_code=True``, and
through none of them without it (never the unconverted architecture with random weights).
m2.save_pretrained, the model's own save_pretrained and Trainer.save_model write the same folder.

The models are tiny random-weight GPT-2 and BERT; the tokenizer is a word-level one built here (offline).
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification, pipeline

import m2convert as m2
from m2convert.errors import CheckpointError, ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = m2.ConvertConfig(filter_order=16)
TEXTS = ["w1 w2 w3 w4 w5", "w6 w7"]
M2_FILES = ("config.json", "m2convert.json", "m2convert_auto.py", "model.safetensors")


def _tokenizer() -> transformers.PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["[UNK]", "[PAD]", "[CLS]", "[SEP]", "[MASK]", "<eos>"] + [f"w{i}" for i in range(90)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]",
                                                cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                                                bos_token="<eos>", eos_token="<eos>")


@pytest.fixture(scope="module", autouse=True)
def remote_code(tmp_path_factory):
    """transformers copies m2convert_auto.py into a scratch modules cache; an untrusted load raises at once
    instead of prompting."""
    import transformers.dynamic_module_utils as dmu

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dmu, "HF_MODULES_CACHE", str(tmp_path_factory.mktemp("hf_modules")))
        patch.setattr(dmu, "TIME_OUT_REMOTE_CODE", 0)
        yield


@pytest.fixture(scope="module")
def tokenizer():
    return _tokenizer()


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory, tokenizer):
    """(converted GPT2LMHeadModel, folder written by its own save_pretrained, with the tokenizer)."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=5,
                                     eos_token_id=5, pad_token_id=1)
    converted = m2.convert(transformers.GPT2LMHeadModel(config).eval(), SMALL)
    folder = tmp_path_factory.mktemp("gpt2") / "gpt2-m2"
    converted.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return converted, folder


@pytest.fixture(scope="module")
def bert(tmp_path_factory, tokenizer):
    """(converted BertForSequenceClassification with 3 labels, folder written by m2.save_pretrained)."""
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=64, num_labels=3)
    converted = m2.convert(transformers.BertForSequenceClassification(config).eval(), SMALL)
    folder = tmp_path_factory.mktemp("bert") / "bert-m2"
    m2.save_pretrained(converted, folder, tokenizer=tokenizer)
    return converted, folder


def _batch(tokenizer) -> dict:
    return dict(tokenizer(TEXTS, padding=True, return_tensors="pt"))


def test_every_way_of_saving_writes_the_same_folder(bert, tmp_path):
    model = copy.deepcopy(bert[0])                    # the copy's own save_pretrained still writes the m2convert folder
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "run"), report_to="none", use_cpu=True)
    transformers.Trainer(model=model, args=args).save_model(str(tmp_path / "trainer"))
    model.save_pretrained(tmp_path / "own")
    m2.save_pretrained(model, tmp_path / "m2")
    names = sorted(p.name for p in (tmp_path / "m2").iterdir())
    assert set(M2_FILES) <= set(names)
    assert sorted(p.name for p in (tmp_path / "own").iterdir()) == names
    assert sorted(p.name for p in (tmp_path / "trainer").iterdir()) == sorted(names + ["training_args.bin"])
    for name in names:
        assert (tmp_path / "own" / name).read_bytes() == (tmp_path / "m2" / name).read_bytes(), name
        assert (tmp_path / "trainer" / name).read_bytes() == (tmp_path / "m2" / name).read_bytes(), name
    loaded = m2.from_pretrained(tmp_path / "trainer")
    inputs = {"input_ids": torch.tensor([[2, 7, 8, 9, 3]])}
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, model(**inputs).logits)


def test_auto_classes_load_the_converted_weights(gpt2, bert, tokenizer):
    batch = _batch(tokenizer)
    converted, folder = gpt2
    head = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    base = AutoModel.from_pretrained(folder, trust_remote_code=True)          # a head folder gives the base model
    assert (type(head), type(base)) == (transformers.GPT2LMHeadModel, transformers.GPT2Model)
    with torch.no_grad():
        assert torch.equal(head(**batch).logits, converted(**batch).logits)
        assert torch.equal(base(**batch).last_hidden_state, converted.transformer(**batch).last_hidden_state)

    converted, folder = bert
    classifier = AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)
    assert type(classifier) is transformers.BertForSequenceClassification
    with torch.no_grad():
        assert torch.equal(classifier(**batch).logits, converted(**batch).logits)


def test_a_recurrent_folder_loads_recurrent_through_the_auto_classes(gpt2, tokenizer, tmp_path):
    recurrent = m2.to_recurrent(gpt2[0], state_size=4, horizon=128).model
    recurrent.save_pretrained(tmp_path / "rec")
    head = AutoModelForCausalLM.from_pretrained(tmp_path / "rec", trust_remote_code=True)
    base = AutoModel.from_pretrained(tmp_path / "rec", trust_remote_code=True)
    assert type(head.transformer.h[0].attn.mixer.filter).__name__ == "RecurrentFilter"
    assert base.m2convert_plan["sites"][0]["settings"]["recurrent"]["state_size"] == 4
    batch = _batch(tokenizer)
    with torch.no_grad():
        assert torch.equal(head(**batch).logits, recurrent(**batch).logits)
        assert torch.equal(base(**batch).last_hidden_state, recurrent.transformer(**batch).last_hidden_state)
    ids = batch["input_ids"][:1]
    settings = {"max_new_tokens": 16, "do_sample": False, "eos_token_id": None, "pad_token_id": 1}
    assert torch.equal(head.generate(ids, **settings), recurrent.generate(ids, **settings))


def test_from_config_of_a_converted_folder_says_what_to_do(gpt2):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(gpt2[1], trust_remote_code=True)
    with pytest.raises(ConfigError, match=r"from_config cannot build a converted model .*from_pretrained\("
                                          r".*m2\.convert\(GPT2LMHeadModel"):
        AutoModelForCausalLM.from_config(config, trust_remote_code=True)


def test_an_auto_class_the_folder_cannot_serve_names_those_it_can(gpt2):
    with pytest.raises(CheckpointError, match=r"GPT2LMHeadModel; transformers.AutoModelForSequenceClassification "
                                              r"cannot load it; it loads with \['AutoModel', 'AutoModelForCausalLM'"):
        AutoModelForSequenceClassification.from_pretrained(gpt2[1], trust_remote_code=True)


def test_the_base_model_of_a_head_folder_saves_and_loads_as_itself(bert, tmp_path, tokenizer):
    base = AutoModel.from_pretrained(bert[1], trust_remote_code=True)
    base.save_pretrained(tmp_path / "base")
    again = m2.from_pretrained(tmp_path / "base")
    assert type(again) is transformers.BertModel and again.m2convert_plan["model_class"] == "BertModel"
    assert {s["fqn"] for s in again.m2convert_plan["sites"]} == {
        s["fqn"].removeprefix("bert.") for s in bert[0].m2convert_plan["sites"]}
    batch = _batch(tokenizer)
    with torch.no_grad():
        assert torch.equal(again(**batch).last_hidden_state, bert[0].bert(**batch).last_hidden_state)


def test_dtype_and_device_are_honoured_and_other_settings_refused(gpt2):
    folder = gpt2[1]
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float64,
                                                 device_map={"": "cpu"})
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    with pytest.raises(ConfigError, match="applies no model arguments or config changes .*'output_hidden_states'"):
        AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, output_hidden_states=True)
    with pytest.raises(ConfigError, match="does not take load_in_8bit=True"):
        AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, load_in_8bit=True)
    with pytest.raises(ConfigError, match="spreads the model over"):
        AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, device_map={"a": "cpu", "b": "meta"})
    # accelerate's placement is refused, not dropped: the advice names what does it.
    for option in ({"max_memory": {"cpu": "1GB"}}, {"offload_folder": "offload"}, {"offload_state_dict": True}):
        with pytest.raises(ConfigError, match=f"does not take {next(iter(option))}=.*accelerate.dispatch_model"):
            AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, **option)


def test_pipelines_run_the_converted_model(gpt2, bert, tokenizer):
    converted, folder = gpt2
    generate = pipeline("text-generation", model=str(folder), trust_remote_code=True)
    ids = tokenizer(TEXTS[0], return_tensors="pt")["input_ids"]
    got = generate(TEXTS[0], max_new_tokens=4, do_sample=False, return_tensors=True)[0]["generated_token_ids"]
    with torch.no_grad():
        assert got == converted.generate(ids, max_new_tokens=4, do_sample=False)[0].tolist()

    converted, folder = bert
    classify = pipeline("text-classification", model=str(folder), trust_remote_code=True, top_k=None,
                        function_to_apply="none")
    scores = {d["label"]: d["score"] for d in classify([TEXTS[0]])[0]}
    with torch.no_grad():
        logits = converted(**tokenizer(TEXTS[0], return_tensors="pt")).logits[0].tolist()
    assert [scores[f"LABEL_{i}"] for i in range(3)] == logits


def test_sentence_transformer_loads_and_saves_the_converted_model(bert, tmp_path):
    from sentence_transformers import SentenceTransformer

    converted, folder = bert
    model = SentenceTransformer(str(folder), trust_remote_code=True, device="cpu")
    features = model.preprocess(TEXTS)
    with torch.no_grad():
        tokens = model[0](dict(features))["token_embeddings"]
        expected = converted.bert(input_ids=features["input_ids"], attention_mask=features["attention_mask"])
    assert torch.equal(tokens, expected.last_hidden_state)
    embeddings = model.encode(TEXTS, convert_to_tensor=True)
    assert embeddings.shape == (2, 32)

    model.save(str(tmp_path / "st"))                         # the base model's own save_pretrained: m2convert folder
    assert all((tmp_path / "st" / name).is_file() for name in M2_FILES)
    again = SentenceTransformer(str(tmp_path / "st"), trust_remote_code=True, device="cpu")
    assert torch.equal(again.encode(TEXTS, convert_to_tensor=True), embeddings)


def test_lm_eval_loglikelihood_matches_the_converted_model(gpt2, tokenizer):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    converted, folder = gpt2
    requests = [Instance(request_type="loglikelihood", doc={}, arguments=("w1 w2 w3", " w4 w5"), idx=0),
                Instance(request_type="loglikelihood", doc={}, arguments=("w9", " w8"), idx=1)]
    loaded = HFLM(pretrained=str(folder), trust_remote_code=True, batch_size=1, device="cpu")
    assert type(loaded.model) is transformers.GPT2LMHeadModel
    in_memory = HFLM(pretrained=converted, tokenizer=tokenizer, batch_size=1, device="cpu")
    assert loaded.loglikelihood(requests) == in_memory.loglikelihood(requests)


def _hflm(folder):
    lm_eval = pytest.importorskip("lm_eval.models.huggingface")
    return lm_eval.HFLM(pretrained=str(folder), batch_size=1, device="cpu")


def _sentence_transformer(folder):
    from sentence_transformers import SentenceTransformer
    return SentenceTransformer(str(folder), device="cpu")


# Each loader on a folder it could load under trust_remote_code=True ("gpt2" or "bert"), called without it.
UNTRUSTED = {
    "AutoModel": ("gpt2", AutoModel.from_pretrained),
    "AutoModelForCausalLM": ("gpt2", AutoModelForCausalLM.from_pretrained),
    "pipeline": ("bert", lambda folder: pipeline("text-classification", model=str(folder))),
    "SentenceTransformer": ("bert", _sentence_transformer),
    "HFLM": ("gpt2", _hflm),
}


@pytest.mark.parametrize("loader", list(UNTRUSTED))
def test_without_trust_remote_code_every_loader_raises(gpt2, bert, loader):
    family, load = UNTRUSTED[loader]
    with pytest.raises(Exception, match="trust_remote_code=True"):
        load({"gpt2": gpt2, "bert": bert}[family][1])


def test_the_tokenizer_of_a_converted_folder_loads_without_asking_to_run_its_code(bert, tokenizer, monkeypatch):
    import transformers.models.auto.configuration_auto as configuration_auto

    from m2convert.loading import load_tokenizer

    asked = []

    def ask(trust_remote_code, model_name, has_local_code, has_remote_code, *args, **kwargs):
        if trust_remote_code is None and has_remote_code:
            asked.append(str(model_name))             # transformers would prompt [y/N] in a terminal here
            raise ValueError("asked")
        return trust_remote_code

    monkeypatch.setattr(configuration_auto, "resolve_trust_remote_code", ask)
    _, folder = bert
    transformers.AutoTokenizer.from_pretrained(folder)
    assert asked == [str(folder)]                     # the plain Auto call asks first
    loaded = load_tokenizer(folder)
    assert asked == [str(folder)]                     # m2convert's loader does not
    assert loaded(TEXTS)["input_ids"] == tokenizer(TEXTS)["input_ids"]
