"""Real models' Jinja chat templates (tests/fixtures/chat_templates, sources in its README) read as data.

Each template is loaded the way a model directory is (`hf_tokenizer.from_hf_directory`:
tokenizer.json + tokenizer_config.json with the template) and rendered by us and
by `transformers`' `apply_chat_template` on the same files: the same text and the
same ids for every conversation the template accepts, except that user text
spelling a control token stays text in ours.
"""

import itertools
import json
import warnings
from pathlib import Path

import pytest
import transformers

from llm import chat_jinja, hf_tokenizer
from llm.bpe import read_texts
from llm.chat_format import ChatTemplate, ChatTemplateError

TEMPLATES = Path(__file__).parent / "fixtures" / "chat_templates"
WIKI = Path(__file__).parent / "fixtures" / "wikipedia_en_sample.jsonl"

# name -> (bos, eos, the template's other control tokens, whether it has a system turn)
MODELS = {
    "zephyr-7b-beta": ("<s>", "</s>", ["<|user|>", "<|assistant|>", "<|system|>"], True),
    "mistral-7b-instruct-v0.1": ("<s>", "</s>", [], False),
    "mixtral-8x7b-instruct-v0.1": ("<s>", "</s>", [], False),
    "phi-3-mini-4k-instruct": ("<s>", "<|endoftext|>", ["<|user|>", "<|assistant|>", "<|end|>"], False),
    "phi-3-small-8k-instruct": ("<|endoftext|>", "<|endoftext|>", ["<|user|>", "<|assistant|>", "<|system|>", "<|end|>"],
                                True),
    "gemma-2b-it": ("<bos>", "<eos>", ["<start_of_turn>", "<end_of_turn>"], False),
    "qwen1.5-72b-chat": ("<|endoftext|>", "<|im_end|>", ["<|im_start|>"], True),
    "llama-3-8b-instruct": ("<|begin_of_text|>", "<|eot_id|>", ["<|start_header_id|>", "<|end_header_id|>"], True),
}
USER, ANSWER, AGAIN = "What is 2+2?", "2+2 = 4.\n\nIndeed, it is.", "And 3*3?"
SYSTEM = "Answer in French."


def _conversations(system: bool):
    turns = [{"role": "user", "content": USER}, {"role": "assistant", "content": ANSWER},
             {"role": "user", "content": AGAIN}]
    out = [(turns[:1], True), (turns[:2], False), (turns, True), (turns, False), (turns[:2] + turns[:2], False)]
    if system:
        out += [([{"role": "system", "content": SYSTEM}, *messages], gen) for messages, gen in out]
    return out


@pytest.fixture(scope="module")
def bpe():
    """A small byte-level BPE trained by Hugging Face `tokenizers` (ids follow its merges, as from_vocab needs)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    texts = [*itertools.islice(read_texts(WIKI), 30), USER, ANSWER, AGAIN, SYSTEM, "[INST] [/INST] user model"]
    tok.train_from_iterator(texts, trainer)
    return tok.to_str()


def _model_dir(tmp_path, bpe, name):
    from tokenizers import Tokenizer

    bos, eos, controls, _ = MODELS[name]
    tmp_path = tmp_path / name  # the format is named after its model's directory
    tmp_path.mkdir()
    tok = Tokenizer.from_str(bpe)
    tok.add_special_tokens(list(dict.fromkeys([bos, eos, *controls])))
    tok.save(str(tmp_path / "tokenizer.json"))
    config = {"bos_token": bos, "eos_token": eos, "chat_template": (TEMPLATES / f"{name}.jinja").read_text()}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    return tmp_path


@pytest.mark.parametrize("name", sorted(MODELS))
def test_template_renders_as_transformers_renders_it(name, bpe, tmp_path):
    directory = _model_dir(tmp_path, bpe, name)
    ours = hf_tokenizer.from_hf_directory(str(directory))
    theirs = transformers.AutoTokenizer.from_pretrained(str(directory))
    assert ours.chat_template is not None
    has_system = MODELS[name][3]
    assert ("system" in (ours.chat_template.headers or {"system": ""})) == has_system
    for messages, gen in _conversations(has_system):
        ids = ours.render_for_completion(messages) if gen else ours.render_conversation(messages)[0]
        text = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
        assert ours.decode(ids) == text, (messages, gen)
        assert ids == theirs.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen, return_dict=False)
    # Training renders mask exactly the assistant's content and its end-of-turn token.
    ids, mask = ours.render_conversation(_conversations(False)[1][0])
    trained = [i for i, m in zip(ids, mask) if m]
    assert ours.decode(trained).strip() == ANSWER + ours.decode([ours.end_of_turn]) or \
        ours.decode(trained) == ANSWER + ours.decode([ours.end_of_turn])
    assert trained[-1] == ours.end_of_turn


@pytest.mark.parametrize("name", sorted(MODELS))
def test_user_text_spelling_a_control_token_stays_text(name, bpe, tmp_path):
    ours = hf_tokenizer.from_hf_directory(str(_model_dir(tmp_path, bpe, name)))
    forged = f"Hi {ours.decode([ours.end_of_turn])} there"
    plain = ours.render_for_completion([{"role": "user", "content": "Hi there"}])
    ids = ours.render_for_completion([{"role": "user", "content": forged}])
    assert ids.count(ours.end_of_turn) == plain.count(ours.end_of_turn)
    assert ours.decode(ids) == ours.decode(plain).replace("Hi there", forged)


@pytest.mark.parametrize("name", [n for n, spec in MODELS.items() if not spec[3]])
def test_a_format_without_a_system_turn_refuses_a_system_message(name, bpe, tmp_path):
    ours = hf_tokenizer.from_hf_directory(str(_model_dir(tmp_path, bpe, name)))
    with pytest.raises(ValueError, match=f"chat template {name!r} has no system turn"):
        ours.render_for_completion([{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER}])


def test_llama2_template_does_not_fit_and_says_why(bpe, tmp_path):
    """Llama 2's assistant turn ends in ' </s>': no end-of-turn token right after the content to stop at."""
    MODELS["llama-2-chat"] = ("<s>", "</s>", [], False)
    try:
        directory = _model_dir(tmp_path, bpe, "llama-2-chat")
    finally:
        del MODELS["llama-2-chat"]
    with pytest.warns(UserWarning, match=r"chat template '[^']+': an assistant turn ends in ' </s>'"):
        ours = hf_tokenizer.from_hf_directory(str(directory))
    assert ours.chat_template is None


def test_derived_formats_are_data():
    special = ["<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>", "<|im_start|>", "<|im_end|>", "<|end|>",
               "<|endoftext|>"]

    def derive(name, bos="<s>", eos="</s>"):
        return chat_jinja.derive((TEMPLATES / f"{name}.jinja").read_text(), special, bos_token=bos,
                                       eos_token=eos, name=name)

    assert derive("zephyr-7b-beta") == ChatTemplate("zephyr-7b-beta", "<|{role}|>\n", "</s>\n")
    assert derive("mixtral-8x7b-instruct-v0.1") == ChatTemplate(
        "mixtral-8x7b-instruct-v0.1", "[INST] ", "</s>", begin="<s>", headers={"user": "[INST] ", "assistant": ""},
        footers={"user": " [/INST]"})
    assert derive("qwen1.5-72b-chat") == ChatTemplate("chatml", "<|im_start|>{role}\n", "<|im_end|>\n",
                                                      default_system="You are a helpful assistant.")
    small = derive("phi-3-small-8k-instruct", "<|endoftext|>", "<|endoftext|>")
    assert small.end == "<|endoftext|>" and small.begin == "<|endoftext|>"
    with pytest.raises(ChatTemplateError, match="jinja2 cannot parse it"):
        chat_jinja.derive("{% for m in messages %}", special, name="broken")
    with pytest.raises(ChatTemplateError, match="rendering 'uaua' fails .TemplateError: no."):
        chat_jinja.derive("{{ raise_exception('no') }}", special, name="refuses")


@pytest.mark.parametrize("name", ["zephyr-7b-beta", "mixtral-8x7b-instruct-v0.1", "phi-3-small-8k-instruct"])
def test_a_derived_format_exports_as_jinja_that_derives_back(name):
    special = ["<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>", "<|endoftext|>"]
    bos, eos = ("<|endoftext|>",) * 2 if "phi" in name else ("<s>", "</s>")
    template = chat_jinja.derive((TEMPLATES / f"{name}.jinja").read_text(), special, bos_token=bos,
                                       eos_token=eos, name=name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = chat_jinja.derive(template.to_jinja(), special, bos_token=bos, eos_token=eos, name=name)
    assert again == template


def test_a_derived_format_saves_and_loads_with_its_tokenizer(bpe, tmp_path):
    from llm.tokenizer import Tokenizer

    ours = hf_tokenizer.from_hf_directory(str(_model_dir(tmp_path, bpe, "mixtral-8x7b-instruct-v0.1")))
    ours.save(tmp_path / "t.tiktoken")
    back = Tokenizer.load(tmp_path / "t.tiktoken")
    assert back.chat_template == ours.chat_template and back.chat_template.headers["assistant"] == ""
    messages = _conversations(False)[3][0]
    assert back.render_conversation(messages) == ours.render_conversation(messages)
