"""GGUF in and out, real models' tokenizers and chat formats.

Every check runs on small GGUF files the tests write themselves; the same checks
run on the real SmolLM2-135M-Instruct file when ../shared is present, and a
llama.cpp check runs where `llama_cpp` (llama-cpp-python) is installed.
"""

import dataclasses
import gzip
import io
import itertools
import json
from pathlib import Path

import jax
import numpy as np
import pytest
import tiktoken
import torch
import transformers

from launch import chat as chat_cli
from launch import export as export_cli
from launch import sample as sample_cli
from launch import sampling_flags
from llm import chat_jinja, gguf, gguf_export, hf, hf_tokenizer, model
from llm.bpe import read_texts, train_bpe
from llm.chat_format import OUR_CHAT, ChatTemplate, ChatTemplateError
from llm.generate import Engine, SamplingParams
from llm.release import load_release, save_release
from llm.tokenizer import Tokenizer
from hf_models import gpt2, llama

gguf_lib = pytest.importorskip("gguf")
tokenizers = pytest.importorskip("tokenizers")

FIXTURE = Path(__file__).parent / "fixtures" / "wikipedia_en_sample.jsonl"
SHARED = Path(__file__).resolve().parents[2] / "shared"
SMOLLM = SHARED / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
WIKINEWS = SHARED / "data" / "pretrain" / "wikinews_en.jsonl.gz"
needs_smollm = pytest.mark.skipif(not SMOLLM.exists(), reason=f"the real model {SMOLLM} is absent (../shared not here)")

# Text that stresses pre-tokenizers: code, digit runs, CJK, emoji, whitespace runs, spelled special tokens.
HARD_TEXTS = [
    "def f(x):\n    return x**2  # square\n\n\n\tif x >= 10_000: print(f'{x:,}')\r\n",
    "Pi is 3.14159265358979, 1234567 apples, 2024-11-29, phone +1 (555) 010-9999, ١٢٣ and ⅷ.",
    "日本語のテキストと中文文本，한국어 텍스트。",
    "emoji 👍🏽 family 👨‍👩‍👧 flags 🇫🇷 and a lone é, ñ, ß, Ω.",
    "spaces     between   words      \n\n\n   and trailing   ",
    "<|im_start|>user\nhi<|im_end|> <|endoftext|> <repo_name> text that spells special tokens",
    "It's, they're, we'VE, I'M, you'll, he'd -- CAPS'S don't.",
    "control \x04 bytes \x1d and a rare plane-15 char \U000f0000 end",
]


# ----------------------------------------------------------------------------- tiny models and tokenizer


@pytest.fixture(scope="module")
def tiny_tok():
    """A 300-id BPE of ours (GPT-4's split pattern: llama.cpp's llama-bpe)."""
    return train_bpe(itertools.islice(read_texts(FIXTURE), 40), 300, name="tiny", progress=False)


def _tiny(family: str, tie: bool = True, rope_scaling: bool = False):
    """A random transformers model (vocab 320 > the tokenizer's 300, so padding ids are exported too) and our copy."""
    # GPT-2 with 1024 positions: transformers' GGUF loader maps gpt2.context_length to n_ctx, not n_positions.
    torch_model = gpt2(320, n_positions=1024) if family == "gpt2" else llama(tie, rope_scaling, vocab_size=320)
    cfg = hf.model_config_from_hf(torch_model.config.to_dict())
    state = {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}
    return cfg, jax.tree.map(jax.numpy.asarray, hf.params_from_hf(cfg, state))


TINY = {"gpt2": ("gpt2",), "llama_tied": ("llama", True), "llama_untied": ("llama", False)}
PROMPT = np.array([[5, 17, 200, 3, 99, 250, 7, 31, 42, 8, 260, 1]])


def _logits(cfg, params, tokens):
    return np.asarray(model.forward(cfg, params, tokens)[0])


def _transformers(path: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


def _greedy(cfg, params, prompt, n):
    [[sample]] = Engine(cfg, params).generate([list(prompt)], SamplingParams(max_new_tokens=n, temperature=0.0))
    return sample.tokens


def _assert_near_greedy(cfg, params, prompt, tokens, tolerance):
    """Each token is the f32 model's greedy choice, or within `tolerance` of its logit (a quantized model's near-tie)."""
    logits = _logits(cfg, params, np.array([[*prompt, *tokens]]))[0, len(prompt) - 1:-1]
    gaps = logits.max(-1) - logits[np.arange(len(tokens)), tokens]
    assert gaps.max() <= tolerance, (gaps, tolerance)


# ----------------------------------------------------------------------------- export and import round trips


@pytest.mark.parametrize("kind", TINY)
def test_f32_export_matches_transformers_and_reloads_exactly(kind, tiny_tok, tmp_path):
    cfg, params = _tiny(*TINY[kind])
    path = tmp_path / "m.gguf"
    gguf_export.save_gguf(str(path), cfg, params, tiny_tok, dtype="f32")
    ours = _logits(cfg, params, PROMPT)
    with torch.no_grad():
        theirs = _transformers(path)(torch.tensor(PROMPT)).logits.numpy()
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)
    cfg2, params2, tok2 = gguf.load_gguf(str(path))
    assert dataclasses.replace(cfg2, max_seq_len=cfg.max_seq_len) == cfg
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    text = "Hello world, 12345 tokens\n\n  of text."
    assert tok2.encode(text) == tiny_tok.encode(text)
    assert tok2.chat_template == OUR_CHAT and tok2.eot == tiny_tok.eot and tok2.bos == tiny_tok.bos
    assert tok2.prompt_start == tiny_tok.prompt_start == tiny_tok.document_start
    assert tok2.render_conversation([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]) == \
        tiny_tok.render_conversation([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])


def test_q8_0_export_is_read_alike_by_transformers_and_keeps_greedy_tokens(tiny_tok, tmp_path):
    """Q8_0: ours and transformers read the same weights (1e-4); against f32, logits move < 2% of their range
    and every greedy token is f32's choice or within 2% of the logit range of it."""
    cfg, params = _tiny("llama", False)
    path = tmp_path / "m.q8_0.gguf"
    gguf_export.save_gguf(str(path), cfg, params, tiny_tok, dtype="q8_0")
    reader = gguf.read(str(path))
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    assert kinds["blk.0.attn_q.weight"] == "Q8_0" and kinds["blk.0.attn_norm.weight"] == "F32"
    cfg_q, params_q, _ = gguf.load_gguf(str(path))
    ours_q = _logits(cfg_q, params_q, PROMPT)
    with torch.no_grad():
        theirs = _transformers(path)(torch.tensor(PROMPT)).logits.numpy()
    np.testing.assert_allclose(theirs, ours_q, atol=1e-4, rtol=0)
    exact = _logits(cfg, params, PROMPT)
    assert np.abs(ours_q - exact).max() < 0.02 * np.ptp(exact)
    _assert_near_greedy(cfg, params, list(PROMPT[0]), _greedy(cfg_q, params_q, PROMPT[0], 8), 0.02 * np.ptp(exact))


def _random_blocks(rows: int, cols: int, qtype) -> np.ndarray:
    """Random raw blocks of a K-quant (gguf-py reads but cannot write them), their f16 scales set small."""
    block, size = gguf_lib.GGML_QUANT_SIZES[qtype]
    raw = np.random.default_rng(0).integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    scale = np.frombuffer(np.float16(1e-3).tobytes(), np.uint8)
    for offset in {"Q4_K": (0, 2), "Q6_K": (208,)}[qtype.name]:  # d (and dmin) in the block layout
        raw[..., offset:offset + 2] = scale
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("kind", ["BF16", "Q4_0", "Q4_1", "Q4_K", "Q6_K"])
def test_quantized_tensor_types_load_alike_in_ours_and_transformers(kind, tiny_tok, tmp_path, monkeypatch):
    """Every matrix stored as `kind` (256-wide rows for the K-quants' blocks): ours and transformers read the same model."""
    config = transformers.LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=False, rms_norm_eps=1e-5)
    torch_model = transformers.LlamaForCausalLM(config).eval()
    cfg = hf.model_config_from_hf(torch_model.config.to_dict())
    params = hf.params_from_hf(cfg, {k: v.detach().numpy() for k, v in torch_model.state_dict().items()})
    qtype = gguf_lib.GGMLQuantizationType[kind]
    add_weight = gguf_export._add_weight

    def quantized(writer, name, tensor, dtype):
        if tensor.ndim < 2:
            return add_weight(writer, name, tensor, dtype)
        raw = (_random_blocks(*tensor.shape, qtype) if kind.endswith("_K")
               else gguf_lib.quants.quantize(tensor, qtype))
        writer.add_tensor(name, raw, raw_dtype=qtype)

    monkeypatch.setattr(gguf_export, "_add_weight", quantized)
    path = tmp_path / f"m.{kind}.gguf"
    gguf_export.save_gguf(str(path), cfg, params, tiny_tok)
    assert {t.tensor_type.name for t in gguf.read(str(path)).tensors if len(t.shape) == 2} == {kind}
    cfg2, params2, _ = gguf.load_gguf(str(path))
    ours = _logits(cfg2, params2, PROMPT)
    with torch.no_grad():
        theirs = _transformers(path)(torch.tensor(PROMPT)).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-5)
    if not kind.endswith("_K"):  # the model's own weights, quantized: bf16 close, 4 bits still correlated
        exact = _logits(cfg, jax.tree.map(jax.numpy.asarray, params), PROMPT)
        if kind == "BF16":
            assert np.abs(ours - exact).max() < 1e-2
        assert np.corrcoef(ours.ravel(), exact.ravel())[0, 1] > 0.9


def test_llama31_rope_scaling_travels_as_rope_freqs(tiny_tok, tmp_path):
    cfg, params = _tiny("llama", True, rope_scaling=True)
    path = tmp_path / "m.gguf"
    gguf_export.save_gguf(str(path), cfg, params, tiny_tok)
    reader = gguf.read(str(path))
    freqs = next(t for t in reader.tensors if t.name == "rope_freqs.weight")
    np.testing.assert_allclose(np.asarray(freqs.data), gguf.rope_factors(cfg))
    cfg2, params2, _ = gguf.load_gguf(str(path))
    np.testing.assert_allclose(_logits(cfg2, params2, PROMPT), _logits(cfg, params, PROMPT), atol=1e-5)


def test_rope_scaling_is_recovered_from_rope_freqs_alone():
    """Files from llama.cpp's converter carry only the tensor: Llama 3.1 8B's factors give an equivalent scaling."""
    llama31 = dict(family="llama", vocab_size=8, n_layer=1, n_embd=4096, n_head=32, n_kv_head=8, mlp_dim=8,
                   max_seq_len=8, rope_theta=500_000.0, rope_factor=8.0, rope_low_freq_factor=1.0,
                   rope_high_freq_factor=4.0, rope_original_max_len=8192)
    cfg = model.ModelConfig(**llama31)
    # The factors llama.cpp stores are transformers' unscaled over llama3-scaled inverse frequencies.
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf_cfg = transformers.LlamaConfig(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8,
                                      max_position_embeddings=131072, rope_theta=500_000.0, rope_scaling=dict(
                                          rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                          original_max_position_embeddings=8192))
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, "cpu")
    unscaled = 1.0 / 500_000.0 ** (np.arange(0, 128, 2) / 128)
    np.testing.assert_allclose(gguf.rope_factors(cfg), unscaled / scaled.numpy(), rtol=1e-5)
    found = gguf._rope_scaling("x.gguf", {}, gguf.rope_factors(cfg), cfg.rope_theta, cfg.head_dim)
    np.testing.assert_allclose(gguf.rope_factors(dataclasses.replace(cfg, **found)), gguf.rope_factors(cfg), rtol=1e-4)


def test_export_cli_and_load_release_accept_gguf(tiny_tok, tmp_path, capsys):
    cfg, params = _tiny("gpt2")
    save_release(str(tmp_path / "release"), cfg, params, tiny_tok)
    out = tmp_path / "tiny.gguf"
    export_cli.main(["--checkpoint", str(tmp_path / "release"), "--format", "gguf", "--out", str(out), "--dtype", "f16"])
    assert "wrote" in capsys.readouterr().out
    cfg2, params2, tok2 = load_release(str(out))
    assert cfg2.family == "gpt2" and tok2.encode("Hello there") == tiny_tok.encode("Hello there")
    assert tok2.n_vocab == cfg.vocab_size and tok2.decode([310]) == "[PAD310]"  # embedding rows past the tokenizer
    np.testing.assert_allclose(_logits(cfg2, params2, PROMPT), _logits(cfg, params, PROMPT), atol=2e-2)
    export_cli.main(["--checkpoint", str(tmp_path / "release"), "--format", "hf", "--out", str(tmp_path / "hf")])
    cfg3, params3, tok3 = load_release(str(tmp_path / "hf"))  # the export loads back, with our tokenizer
    assert cfg3.family == "gpt2" and tok3.encode("Hello there") == tiny_tok.encode("Hello there")
    np.testing.assert_allclose(_logits(cfg3, params3, PROMPT), _logits(cfg, params, PROMPT), atol=1e-5)


def test_gguf_hub_id_offline_is_a_clear_error(monkeypatch, tmp_path):
    import huggingface_hub

    # A missing file under a local folder is a missing file, not a hub id of that shape.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    with pytest.raises(FileNotFoundError, match="no GGUF file at runs/x/model.gguf"):
        load_release("runs/x/model.gguf")

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(RuntimeError, match="could not fetch 'someone/Some-Model-GGUF/model.Q4_0.gguf'.*Offline"):
        load_release("someone/Some-Model-GGUF/model.Q4_0.gguf")
    assert gguf.is_gguf("someone/Some-Model-GGUF") and gguf.is_gguf("someone/repo:Q4_K_M")
    assert not gguf.is_gguf("openai-community/gpt2")


# ----------------------------------------------------------------------------- bad input


@pytest.fixture
def good_file(tiny_tok, tmp_path):
    cfg, params = _tiny("llama", True)
    path = tmp_path / "good.gguf"
    gguf_export.save_gguf(str(path), cfg, params, tiny_tok)
    return path, cfg, params


def test_truncated_file_names_the_file(good_file, tmp_path):
    path, *_ = good_file
    data = path.read_bytes()
    for size, what in ((len(data) // 2, "truncated or corrupt"), (100, "truncated or corrupt"), (3, "not a GGUF file")):
        short = tmp_path / f"short{size}.gguf"
        short.write_bytes(data[:size])
        with pytest.raises((gguf.GGUFError, ValueError), match=f"{short}.*{what}"):
            gguf.load_gguf(str(short))


def test_unsupported_architecture_tensor_type_and_pre_tokenizer_name_the_field(tiny_tok, tmp_path, monkeypatch):
    writer = gguf_lib.GGUFWriter(str(tmp_path / "mamba.gguf"), "mamba")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    with pytest.raises(gguf.GGUFError, match=r"mamba.gguf: general.architecture is 'mamba'"):
        gguf.load_gguf(str(tmp_path / "mamba.gguf"))

    cfg, params = _tiny("llama", True)
    add_weight = gguf_export._add_weight

    def int_norm(writer, name, tensor, dtype):
        if name == "blk.1.ffn_norm.weight":
            return writer.add_tensor(name, tensor.astype(np.int32))
        return add_weight(writer, name, tensor, dtype)

    monkeypatch.setattr(gguf_export, "_add_weight", int_norm)
    gguf_export.save_gguf(str(tmp_path / "int.gguf"), cfg, params, tiny_tok)
    with pytest.raises(gguf.GGUFError, match=r"int.gguf: tensor blk.1.ffn_norm.weight has type I32"):
        gguf.load_gguf(str(tmp_path / "int.gguf"))
    monkeypatch.setattr(gguf_export, "_add_weight", add_weight)

    monkeypatch.setattr(hf_tokenizer, "pre_tokenizer_of_pattern", lambda pattern: "jais")
    gguf_export.save_gguf(str(tmp_path / "pre.gguf"), cfg, params, tiny_tok)
    with pytest.raises(gguf.GGUFError, match=r"pre.gguf: tokenizer.ggml.pre is 'jais'"):
        gguf.load_gguf(str(tmp_path / "pre.gguf"))


def test_tokenizer_json_with_unknown_pre_tokenizer_or_normalizer_is_a_clear_error(tmp_path):
    spec = {"model": {"type": "BPE", "vocab": {"a": 0}, "merges": []}, "normalizer": None,
            "decoder": {"type": "ByteLevel"}, "pre_tokenizer": {"type": "Metaspace", "replacement": "▁"}}
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(spec))
    with pytest.raises(ValueError, match=r"tokenizer.json: pre_tokenizer .*Metaspace.* is not supported"):
        hf_tokenizer.from_tokenizer_json(path)
    spec["normalizer"] = {"type": "NFC"}
    path.write_text(json.dumps(spec))
    with pytest.raises(ValueError, match=r"tokenizer.json: normalizer is 'NFC'"):
        hf_tokenizer.from_tokenizer_json(path)


@pytest.mark.parametrize("rule", [None, [], ["<|im_start|>"]], ids=["ours", "no_bos", "own_bos"])
def test_export_keeps_the_prompt_start_rule(rule, tiny_tok, tmp_path):
    """add_bos_token and bos_token_id say how a prompt starts: ours, transformers and a re-export read it alike."""
    cfg, params = _tiny("llama", True)
    tok = Tokenizer(tiny_tok.encoding, prompt_start=rule)
    start = tok.prompt_start
    assert start == ([tok.eot] if rule is None else [tok.token_id(t) for t in rule])
    for i in range(2):  # the export, then a re-export of what was read back
        path = tmp_path / f"m{i}.gguf"
        gguf_export.save_gguf(str(path), cfg, params, tok)
        meta = gguf.metadata(gguf.read(str(path)))
        assert meta["tokenizer.ggml.add_bos_token"] == bool(start)
        assert not start or meta["tokenizer.ggml.bos_token_id"] == start[0]
        tok = gguf.read_tokenizer(str(path), gguf.read(str(path)), meta)
        assert tok.prompt_start == start and tok.document_start == tiny_tok.document_start
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    assert theirs("Hello world").input_ids == [*start, *tiny_tok.encode("Hello world")]


# ----------------------------------------------------------------------------- tokenizers: ours == Hugging Face's


def _hf_bpe(tokens, merges, pre: str):
    """Hugging Face `tokenizers` built from a byte-level vocabulary and merges, with the named pre-tokenizer."""
    from tokenizers import Regex, decoders, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(tokens)}
    bpe = tokenizers.Tokenizer(models.BPE(vocab, [tuple(m.split(" ", 1)) for m in merges], ignore_merges=pre == "llama-bpe"))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "gpt-2":
        bpe.pre_tokenizer = byte_level
    elif pre == "smollm":
        bpe.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        bpe.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(hf_tokenizer.PRE_TOKENIZERS[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.decoder = decoders.ByteLevel()
    return bpe


def _texts(n_wikinews: int) -> list[str]:
    texts = list(HARD_TEXTS) + list(itertools.islice(read_texts(FIXTURE), 20))
    if WIKINEWS.exists():
        with gzip.open(WIKINEWS, "rt") as f:
            texts += [json.loads(line)["text"] for line in itertools.islice(f, n_wikinews)]
    return texts


def _assert_same_ids(ours: Tokenizer, theirs, texts, special: list[str]):
    for text in texts:
        assert ours.encode(text) == theirs.encode(text, add_special_tokens=False).ids, text[:80]
    # Spelled special tokens: text unless allowed (tokenizers matches them whole, as an allowed encode does).
    theirs.add_special_tokens(special)
    text = "".join(special) + " plain " + special[0]
    assert ours.encode_allowing_special(text) == theirs.encode(text, add_special_tokens=False).ids
    theirs.encode_special_tokens = True
    assert ours.encode(text) == theirs.encode(text, add_special_tokens=False).ids


def _vocab_of(tok: Tokenizer, size: int):
    enc = tok.encoding
    by_id = {rank: hf_tokenizer.token_string(t) for t, rank in enc._mergeable_ranks.items() if rank < size}
    by_id.update({i: t for t, i in enc._special_tokens.items()})
    return [by_id.get(i, f"[PAD{i}]") for i in range(size)], gguf_export._merges(enc._mergeable_ranks)


@pytest.mark.parametrize("which", ["gpt2", "tiny"])
def test_converted_vocabularies_encode_like_hugging_face(which, tiny_tok):
    """GPT-2's real BPE (tiktoken's ranks, as GGUF writes them) and our tiny BPE, rebuilt from tokens + merges."""
    tok = Tokenizer.load("gpt2") if which == "gpt2" else tiny_tok
    tokens, merges = _vocab_of(tok, tok.n_vocab)
    pre = hf_tokenizer.pre_tokenizer_of_pattern(tok.encoding._pat_str)
    special = dict(tok.encoding._special_tokens)
    converted = hf_tokenizer.from_vocab(tokens, merges, pre=pre, special=special, source=which)
    theirs = _hf_bpe(tokens, merges, pre)
    texts = _texts(200 if which == "gpt2" else 0)
    for text in texts[:30]:
        assert converted.encode(text) == tok.encode(text)
    _assert_same_ids(converted, theirs, texts, list(special)[:3])


def test_tokenizer_json_round_trip(tiny_tok, tmp_path):
    """A tokenizer.json that `tokenizers` writes (Llama 3's Split + ByteLevel) reads back to the same ids."""
    tokens, merges = _vocab_of(tiny_tok, tiny_tok.n_vocab)
    theirs = _hf_bpe(tokens, merges, "llama-bpe")
    theirs.add_special_tokens(list(tiny_tok.encoding._special_tokens))
    from tokenizers import decoders
    theirs.decoder = decoders.ByteLevel()
    theirs.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    ours = hf_tokenizer.from_hf_directory(str(tmp_path))
    assert ours.eot == tiny_tok.eot and ours.chat_template is None
    for text in _texts(0):
        assert ours.encode(text) == tiny_tok.encode(text)
    # A Hugging Face Llama directory loads with its tokenizer.json (no guessed encoding).
    cfg, params = _tiny("llama", True)
    hf.save_hf(cfg, params, str(tmp_path))
    _, _, loaded = load_release(str(tmp_path))
    assert loaded.encode(HARD_TEXTS[0]) == tiny_tok.encode(HARD_TEXTS[0]) and loaded.n_vocab == tiny_tok.n_vocab


@pytest.mark.parametrize(("config", "post"), [
    ({"add_bos_token": True}, None),  # transformers drops the config's flags beside a tokenizer.json ...
    ({"add_bos_token": False}, "template"),  # ... so its post-processor alone decides
    ({}, "template"),
    ({}, "byte_level"),
    ({}, "sequence"),
    ({}, None),
], ids=["flag_without_processor", "flag_against_template", "template", "byte_level", "sequence", "none"])
def test_hugging_face_prompts_start_as_transformers_starts_them(config, post, tiny_tok, tmp_path):
    from tokenizers import processors

    tokens, merges = _vocab_of(tiny_tok, tiny_tok.n_vocab)
    theirs = _hf_bpe(tokens, merges, "llama-bpe")
    theirs.add_special_tokens(list(tiny_tok.encoding._special_tokens))
    bos = ("<|im_start|>", tiny_tok.token_id("<|im_start|>"))
    template = processors.TemplateProcessing(single=f"{bos[0]} $A", pair=f"{bos[0]} $A $B", special_tokens=[bos])
    theirs.post_processor = {"template": template, "byte_level": processors.ByteLevel(trim_offsets=False),
                             "sequence": processors.Sequence([processors.ByteLevel(trim_offsets=False), template]),
                             None: None}[post]
    theirs.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": bos[0], "eos_token": "<|endoftext|>", **config}))
    ours = hf_tokenizer.from_hf_directory(str(tmp_path))
    assert ours.prompt_start == ([bos[1]] if post in ("template", "sequence") else [])
    expected = transformers.AutoTokenizer.from_pretrained(str(tmp_path))("Hello world").input_ids
    assert [*ours.prompt_start, *ours.encode("Hello world")] == expected


# ----------------------------------------------------------------------------- chat formats


def _hf_chat(tokens, merges, pre, special, jinja):
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=_hf_bpe(tokens, merges, pre))
    fast.add_special_tokens({"additional_special_tokens": list(special)})
    fast.chat_template = jinja
    return fast


CONVERSATION = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "2+2 = 4.\n\nIndeed."},
                {"role": "user", "content": " And <|im_end|> 3*3?"}]


def test_our_format_exports_as_a_jinja_template_that_transformers_renders_alike(tiny_tok):
    tokens, merges = _vocab_of(tiny_tok, tiny_tok.n_vocab)
    fast = _hf_chat(tokens, merges, "llama-bpe", tiny_tok.encoding._special_tokens, OUR_CHAT.to_jinja())
    safe = [m for m in CONVERSATION if "<|" not in m["content"]]  # transformers would read spelled tokens as tokens
    assert fast.apply_chat_template(safe, add_generation_prompt=True, tokenize=True, return_dict=False) == \
        tiny_tok.render_for_completion(safe)


def test_chatml_template_with_default_system_renders_and_masks(tiny_tok):
    ranks = tiny_tok.encoding._mergeable_ranks
    enc = tiktoken.Encoding("chatml", pat_str=tiny_tok.encoding._pat_str, mergeable_ranks=ranks,
                            special_tokens={"<|endoftext|>": 300, "<|im_start|>": 301, "<|im_end|>": 302})
    template = ChatTemplate("chatml", "<|im_start|>{role}\n", "<|im_end|>\n", default_system="Be brief.")
    tok = Tokenizer(enc, template)
    ids, mask = tok.render_conversation(CONVERSATION[:2])
    assert tok.decode(ids) == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
                               "<|im_start|>assistant\n2+2 = 4.\n\nIndeed.<|im_end|>\n")
    trained = tok.decode([i for i, m in zip(ids, mask) if m])
    assert trained in ("2+2 = 4.\n\nIndeed.<|im_end|>", "\n2+2 = 4.\n\nIndeed.<|im_end|>")
    assert tok.end_of_turn == 302 and tok.decode(tok.turn_end_ids) == "<|im_end|>\n"
    continued = tok.render_for_completion(CONVERSATION[2:], start=False)
    assert tok.decode(continued) == "<|im_start|>user\n And <|im_end|> 3*3?<|im_end|>\n<|im_start|>assistant\n"
    assert continued.count(302) == 1  # the spelled <|im_end|> stayed text
    assert not tok.has_tool("python")
    with pytest.raises(ValueError, match="has no tool tokens"):
        tok.render_for_completion([{"role": "assistant", "content": [{"type": "python", "text": "1+1"}]},
                                   {"role": "tool", "content": "2"}])


def test_llama3_template_is_read_from_its_jinja(tiny_tok):
    special = {"<|begin_of_text|>": 300, "<|end_of_text|>": 301, "<|start_header_id|>": 302,
               "<|end_header_id|>": 303, "<|eot_id|>": 304}
    jinja = ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
             "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}")
    template = chat_jinja.derive(jinja, special, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    assert template == ChatTemplate("llama3", "<|start_header_id|>{role}<|end_header_id|>\n\n", "<|eot_id|>",
                                    begin="<|begin_of_text|>")
    enc = tiktoken.Encoding("l3", pat_str=hf_tokenizer.LLAMA3_SPLIT_PATTERN,
                            mergeable_ranks=tiny_tok.encoding._mergeable_ranks, special_tokens=special)
    tok = Tokenizer(enc, template, bos="<|begin_of_text|>", eot="<|end_of_text|>")
    assert tok.decode(tok.render_for_completion(CONVERSATION[:1])) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert tok.end_of_turn == 304 and tok.bos == [300] and tok.eot == 301
    assert tok.document_start == [300]  # documents start with Llama 3's BOS, not its end-of-text
    with pytest.raises(ChatTemplateError, match="chat template .unnamed.: its first user turn opens unlike"):
        chat_jinja.derive("{{ messages }}", special)


def test_tokenizer_with_a_foreign_template_saves_and_loads(tmp_path):
    enc = tiktoken.Encoding("t", pat_str=hf_tokenizer.SMOLLM_SPLIT_PATTERN,
                            mergeable_ranks={bytes([b]): b + 2 for b in range(256)},
                            special_tokens={"<|im_start|>": 0, "<|im_end|>": 1})
    template = ChatTemplate("chatml", "<|im_start|>{role}\n", "<|im_end|>\n", default_system="Hi.")
    tok = Tokenizer(enc, template, bos=None, eot="<|im_end|>", dropped=[])
    tok.save(tmp_path / "t.tiktoken")
    back = Tokenizer.load(tmp_path / "t.tiktoken")
    assert back.chat_template == template and back.bos == [] and back.eot == 1 and back.n_vocab == 258
    assert back.document_start == [1]  # no BOS: the end-of-text token separates documents
    assert back.render_for_completion(CONVERSATION[:1]) == tok.render_for_completion(CONVERSATION[:1])


# ----------------------------------------------------------------------------- the real model: SmolLM2-135M-Instruct


@pytest.fixture(scope="module")
def smollm():
    if not SMOLLM.exists():
        pytest.skip(f"the real model {SMOLLM} is absent (../shared not here)")
    return gguf.load_gguf(str(SMOLLM))


@pytest.fixture(scope="module")
def smollm_transformers():
    """transformers' own float32 SmolLM2, read from the same file."""
    if not SMOLLM.exists():
        pytest.skip(f"the real model {SMOLLM} is absent (../shared not here)")
    return _transformers(SMOLLM)


@needs_smollm
def test_smollm2_tokenizer_equals_hugging_face_on_wikinews_code_digits_cjk_emoji(smollm):
    _, _, tok = smollm
    reader = gguf.read(str(SMOLLM))
    field = reader.fields["tokenizer.ggml.tokens"]
    tokens = [bytes(field.parts[i]).decode() for i in field.data]
    field = reader.fields["tokenizer.ggml.merges"]
    merges = [bytes(field.parts[i]).decode() for i in field.data]
    assert reader.fields["tokenizer.ggml.pre"].contents() == "smollm"
    theirs = _hf_bpe(tokens, merges, "smollm")
    _assert_same_ids(tok, theirs, _texts(300), ["<|im_start|>", "<|im_end|>", "<|endoftext|>"])
    # Our reading of its chat template renders as transformers renders the template itself.
    jinja = reader.fields["tokenizer.chat_template"].contents()
    fast = _hf_chat(tokens, merges, "smollm", tok.encoding._special_tokens, jinja)
    safe = [m for m in CONVERSATION if "<|" not in m["content"]]
    for messages in (safe, [{"role": "system", "content": "Answer in French."}, *safe]):
        assert fast.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False) == \
            tok.render_for_completion(messages)


@pytest.mark.slow
@needs_smollm
def test_smollm2_logits_and_greedy_generation_equal_transformers(smollm, smollm_transformers):
    cfg, params, tok = smollm
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.rope_theta, cfg.tie_embeddings) == \
        (30, 576, 9, 3, 100_000.0, True)
    hf_model = smollm_transformers
    prompts = [tok.render_for_completion([{"role": "user", "content": "What is the capital of France?"}]),
               [*tok.bos, *tok.encode("The history of the Roman Empire")]]
    for prompt in prompts:
        with torch.no_grad():
            theirs = hf_model(torch.tensor([prompt])).logits.numpy()
        ours = _logits(cfg, params, np.array([prompt]))
        # 30 float32 layers on both sides: logits up to ~30 agree within 1e-4 plus 1e-5 of their size.
        # The first position (the document token, whose activations are largest) is looser: against a
        # float64 run of transformers, ours is off there by 2.0e-4 and transformers' own float32 by 1.0e-4.
        np.testing.assert_allclose(ours[:, 1:], theirs[:, 1:], atol=1e-4, rtol=1e-5)
        np.testing.assert_allclose(ours[:, :1], theirs[:, :1], atol=3e-4, rtol=1e-5)
        assert np.abs(ours - theirs).mean() < 5e-5
    prompt = prompts[0]
    ours = _greedy(cfg, params, prompt, 8)
    with torch.no_grad():
        theirs = hf_model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)[0, len(prompt):].tolist()
    assert ours == theirs


BASE_PROMPTS = ["The capital of France is", "Once upon a time, there was a", "def fibonacci(n):",
                "The three primary colors are"]


@pytest.mark.slow
@needs_smollm
def test_smollm2_base_prompts_start_as_its_file_says_and_continue_as_transformers(
        smollm, smollm_transformers, monkeypatch, capsys):
    """tokenizer.ggml.add_bos_token = false: no token before a prompt, as in transformers and llama.cpp.

    Its documents start with <|endoftext|> (`document_start`); putting that before
    these prompts changes every continuation.
    """
    cfg, params, tok = smollm
    assert tok.prompt_start == [] and tok.document_start == [tok.eot]
    theirs_tok = transformers.AutoTokenizer.from_pretrained(str(SMOLLM.parent), gguf_file=SMOLLM.name)
    prompts = [sample_cli.prompt_tokens(tok, text) for text in BASE_PROMPTS]
    assert prompts == [theirs_tok(text).input_ids for text in BASE_PROMPTS]
    samples = Engine(cfg, params, tok).generate(prompts, SamplingParams(max_new_tokens=12, temperature=0.0))
    theirs = []
    for prompt in prompts:
        with torch.no_grad():
            out = smollm_transformers.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)
        theirs.append(out[0, len(prompt):].tolist())
    assert [sample.tokens for [sample] in samples] == theirs
    monkeypatch.setattr(sampling_flags, "load", lambda args: smollm)
    sample_cli.main(["--checkpoint", str(SMOLLM), "--prompt", BASE_PROMPTS[0], "--temperature", "0",
                     "--max-new-tokens", "12"])
    assert capsys.readouterr().out == f"{BASE_PROMPTS[0]}{tok.decode(theirs[0])}\n[length, 12 tokens]\n"


@pytest.mark.slow
@needs_smollm
def test_smollm2_chat_answers_paris_and_stops_at_its_end_of_turn(smollm, monkeypatch, capsys):
    cfg, params, tok = smollm
    assert tok.chat_template.name == "chatml" and tok.chat_template.default_system.startswith("You are a helpful")
    prompt = tok.render_for_completion([{"role": "user", "content": "What is the capital of France?"}])
    [[sample]] = Engine(cfg, params, tok).generate(
        [prompt], SamplingParams(max_new_tokens=24, temperature=0.0, stop_token_ids=tok.chat_stop_ids))
    assert "Paris" in sample.text and sample.finish_reason == "stop" and sample.tokens[-1] == tok.end_of_turn
    monkeypatch.setattr(sampling_flags, "load", lambda args: smollm)
    monkeypatch.setattr("sys.stdin", io.StringIO("What is the capital of France?\n\n"))
    chat_cli.main(["--checkpoint", str(SMOLLM), "--temperature", "0", "--max-new-tokens", "24"])
    captured = capsys.readouterr()
    assert "Paris" in captured.out and "<|im_end|>" not in captured.out
    assert "no tool tokens; chatting without tools" in captured.err


# ----------------------------------------------------------------------------- llama.cpp (where installed)


@pytest.mark.parametrize("kind", ["llama_untied", "gpt2"])
def test_llama_cpp_runs_our_exports(kind, tiny_tok, tmp_path):
    llama_cpp = pytest.importorskip(
        "llama_cpp", reason="llama-cpp-python is not installed (pip install llama-cpp-python: ~4.5 min build)")
    cfg, params = _tiny(*TINY[kind])
    prompt = list(PROMPT[0])
    ours = _greedy(cfg, params, prompt, 8)
    for dtype in ("f32", "q8_0"):
        path = tmp_path / f"m.{dtype}.gguf"
        gguf_export.save_gguf(str(path), cfg, params, tiny_tok, dtype=dtype)
        llm = llama_cpp.Llama(str(path), n_ctx=64, verbose=False, logits_all=True, n_threads=2)
        for text in HARD_TEXTS[:7]:  # llama.cpp tokenizes with the exported vocabulary, merges and pre-tokenizer
            assert llm.tokenize(text.encode(), add_bos=False, special=False) == tiny_tok.encode(text), text
        llm.eval(prompt)
        theirs_logits = np.array(llm.eval_logits)  # one row per prompt position
        exact = _logits(cfg, params, PROMPT)[0]
        tolerance = 1e-3 if dtype == "f32" else 0.02 * np.ptp(exact)
        assert np.abs(theirs_logits - exact).max() < tolerance, dtype
        llm.reset()
        theirs = []
        for token in llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0):
            theirs.append(int(token))
            if len(theirs) == 8:
                break
        if dtype == "f32":
            assert theirs == ours
        else:  # llama.cpp also rounds activations to 8 bits in Q8_0 products: near-ties may flip
            _assert_near_greedy(cfg, params, prompt, theirs, tolerance)
