"""Byte-level BPE tokenizers of real models (Hugging Face `tokenizer.json`, GGUF's `tokenizer.ggml.*`) as tiktoken encodings.

    tok = from_tokenizer_json("SmolLM2/tokenizer.json", chat_template=...)
    tok = from_vocab(tokens, merges, pre="smollm", special={...}, source="model.gguf")

A byte-level BPE (GPT-2's scheme) spells every token as bytes mapped to printable
characters (`Ġ` is a space) and merges adjacent pairs in the order of its merge
list. tiktoken merges the adjacent pair whose concatenation has the lowest rank;
taking each token's id as its rank gives the same merges when the ids of merge
results grow with the merge order, which `from_vocab` checks rather than assumes.

The pre-tokenizer (how text is cut into pieces before merging) becomes one
tiktoken regex per named scheme (`PRE_TOKENIZERS`, llama.cpp's `tokenizer.ggml.pre`
names). A scheme not listed is an error naming it: a near-miss pattern would encode
most text the same and silently differ on the rest.
"""

from __future__ import annotations

import functools
import json
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import tiktoken

from llm import chat_jinja
from llm.chat_format import ChatTemplate, ChatTemplateError
from llm.encodings import (
    ENDOFTEXT,
    GPT2_SPLIT_PATTERN,
    GPT4_SPLIT_PATTERN,
    O200K_SPLIT_PATTERN,
)
from llm.tokenizer import Tokenizer

# Llama 3's own tiktoken pattern (cl100k_base's, spelled without possessive quantifiers).
LLAMA3_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# SmolLM2 (`smollm`): Hugging Face's Digits(individual_digits) and then GPT-2's byte-level
# regex on each piece, as one regex. Digits cut the text before the GPT-2 regex runs, so a
# digit is always its own piece and a whitespace run before a digit ends its piece: GPT-2's
# `\s+(?!\S)` becomes `\s+(?![^\s\p{N}])`, and ` ?\p{N}+` becomes `\p{N}`.
SMOLLM_SPLIT_PATTERN = r"""\p{N}|'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""

# llama.cpp's pre-tokenizer names (tokenizer.ggml.pre) -> tiktoken pattern.
PRE_TOKENIZERS: Mapping[str, str] = {
    "gpt-2": GPT2_SPLIT_PATTERN,
    "smollm": SMOLLM_SPLIT_PATTERN,
    "llama-bpe": LLAMA3_SPLIT_PATTERN,
    "llama3": LLAMA3_SPLIT_PATTERN,
    "llama-v3": LLAMA3_SPLIT_PATTERN,
    "gpt-4o": O200K_SPLIT_PATTERN,
}


@functools.cache
def byte_decoder() -> dict[str, int]:
    """GPT-2's printable character -> byte map (the inverse of `bytes_to_unicode`)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return {c: b for b, c in chars.items()}


@functools.cache
def byte_encoder() -> dict[int, str]:
    return {b: c for c, b in byte_decoder().items()}


def token_bytes(token: str) -> bytes | None:
    """The bytes a byte-level token spells, or None if it uses a character outside the byte alphabet."""
    decoder = byte_decoder()
    try:
        return bytes(decoder[c] for c in token)
    except KeyError:
        return None


def token_string(data: bytes) -> str:
    """A token's bytes in GPT-2's printable spelling (how GGUF and tokenizer.json write them)."""
    encoder = byte_encoder()
    return "".join(encoder[b] for b in data)


def from_vocab(
    tokens: Sequence[str],
    merges: Sequence[str | Sequence[str]],
    *,
    pre: str,
    special: Mapping[str, int],
    source: str,
    name: str | None = None,
    chat_template: ChatTemplate | None = None,
    bos: str | None = None,
    eot: str | None = None,
    prompt_start: Sequence[str] | None = None,
) -> Tokenizer:
    """A Tokenizer from a byte-level BPE: `tokens[i]` is id i, `merges` "a b" in priority order, `special` name -> id.

    `source` names the file in errors; `pre` is a key of PRE_TOKENIZERS; `prompt_start`
    is `Tokenizer`'s (the model's own BOS rule).
    """
    if pre not in PRE_TOKENIZERS:
        raise ValueError(
            f"{source}: pre-tokenizer {pre!r} is not supported (supported: {sorted(PRE_TOKENIZERS)}); "
            "its text splitting would differ from the model's"
        )
    ranks: dict[bytes, int] = {}
    for i, token in enumerate(tokens):
        if i in special.values():
            continue
        data = token_bytes(token)
        if data is None:
            raise ValueError(f"{source}: token {i} {token!r} is not spelled in the byte-level alphabet (not a byte-level BPE)")
        if data in ranks:
            raise ValueError(f"{source}: tokens {ranks[data]} and {i} spell the same bytes {data!r}")
        ranks[data] = i
    # Bytes the vocabulary never saw (control characters, bytes invalid in UTF-8): Hugging Face's
    # and llama.cpp's BPE drop them from the text. tiktoken needs a rank for every byte, so each
    # gets a placeholder id above the vocabulary, which Tokenizer.encode then drops.
    size = max([*(r + 1 for r in ranks.values()), *(i + 1 for i in special.values())])
    dropped = []
    for b in range(256):
        if bytes([b]) not in ranks:
            ranks[bytes([b])] = size + len(dropped)
            dropped.append(ranks[bytes([b])])
    # tiktoken ranks a merge by its result's id; that is the merge list's order only if ids grow with it.
    last = -1
    for number, merge in enumerate(merges):
        a, b = merge.split(" ", 1) if isinstance(merge, str) else merge
        joined = (token_bytes(a) or b"") + (token_bytes(b) or b"")
        rank = ranks.get(joined)
        if rank is None:
            raise ValueError(f"{source}: merge {number} ({a!r} {b!r}) makes a token that is not in the vocabulary")
        if rank < last:  # equal: another split of the same token
            raise ValueError(
                f"{source}: merge {number} ({a!r} {b!r}) makes token {rank}, not after the previous merge's {last}: "
                "ids do not follow the merge order, so tiktoken ranks cannot reproduce this BPE"
            )
        last = rank
    encoding = tiktoken.Encoding(name or os.path.basename(source), pat_str=PRE_TOKENIZERS[pre],
                                 mergeable_ranks=ranks, special_tokens=dict(special))
    return Tokenizer(encoding, chat_template=chat_template, bos=bos, eot=eot, dropped=dropped,
                     prompt_start=prompt_start)


def from_tokenizer_json(path: str | os.PathLike, *, chat_template: ChatTemplate | None = None,
                        config: Mapping[str, Any] | None = None) -> Tokenizer:
    """A Tokenizer from a Hugging Face `tokenizer.json` (byte-level BPE with a known pre-tokenizer).

    `config` is the directory's `tokenizer_config.json` when present: it names bos/eos and the chat template.
    Prompts start as transformers starts them (`prompt_start_tokens`).
    """
    path = str(path)
    with open(path, encoding="utf-8") as f:
        spec = json.load(f)
    model = spec.get("model") or {}
    _check(model.get("type") == "BPE", path, "model.type", model.get("type"), "'BPE'")
    for field in ("byte_fallback", "continuing_subword_prefix", "end_of_word_suffix", "dropout"):
        _check(not model.get(field), path, f"model.{field}", model.get(field), "unset")
    _check(spec.get("normalizer") is None, path, "normalizer", (spec.get("normalizer") or {}).get("type"), "none")
    decoder = spec.get("decoder") or {}
    _check(decoder.get("type") == "ByteLevel", path, "decoder.type", decoder.get("type"), "'ByteLevel'")
    pre = pre_tokenizer_name(spec.get("pre_tokenizer"), path)
    vocab: dict[str, int] = dict(model["vocab"])
    special = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
    size = max([*vocab.values(), *special.values()]) + 1
    tokens = [""] * size
    for token, i in vocab.items():
        tokens[i] = token
    for token, i in special.items():
        tokens[i] = token
    holes = [i for i, t in enumerate(tokens) if t == ""]
    if holes:
        raise ValueError(f"{path}: ids {holes[:8]} have no token")
    config = dict(config or {})
    template_source = config.get("chat_template")
    if chat_template is None and isinstance(template_source, str):
        chat_template = read_chat_template(template_source, special, _token_name(config.get("bos_token")),
                                           _token_name(config.get("eos_token")), path,
                                           os.path.basename(os.path.dirname(os.path.abspath(path))) or "hf")
    bos, eot = document_tokens(special, _token_name(config.get("bos_token")) if config.get("add_bos_token") else None,
                               _token_name(config.get("eos_token")))
    return from_vocab(
        tokens, model.get("merges", []), pre=pre, special=special, source=path, chat_template=chat_template,
        bos=bos, eot=eot, prompt_start=prompt_start_tokens(spec.get("post_processor")),
        name=os.path.basename(os.path.dirname(os.path.abspath(path))) or "hf",
    )


def read_chat_template(source: str, special: Mapping[str, int], bos: str | None, eos: str | None,
                       where: str, name: str) -> ChatTemplate | None:
    """A model's Jinja chat template as data, or None (with a warning saying why) where it does not fit one.

    None rather than an error: the model still loads and samples as a base model; chatting then says it has no format.
    """
    try:
        return chat_jinja.derive(source, special, bos_token=bos, eos_token=eos, name=name)
    except ChatTemplateError as e:
        warnings.warn(f"{where}: {e}; it loads without a chat format", stacklevel=2)
        return None


def prompt_start_tokens(post_processor: Mapping[str, Any] | None) -> list[str]:
    """The special tokens `transformers` puts before a prompt: those tokenizer.json's post-processor prepends.

    transformers (5) drops tokenizer_config.json's `add_bos_token` and `add_eos_token`
    when there is a tokenizer.json, as there always is here, so its post-processor
    alone decides: Llama 3's TemplateProcessing prepends `<|begin_of_text|>`, GPT-2's
    ByteLevel nothing, and no post-processor nothing.
    """
    processor = post_processor or {}
    kind = processor.get("type")
    if kind == "Sequence":  # each processor wraps what the ones before it made
        return [token for p in reversed(processor.get("processors") or []) for token in prompt_start_tokens(p)]
    if kind == "TemplateProcessing":
        tokens = []
        for piece in processor.get("single") or []:
            if "SpecialToken" not in piece:
                break
            tokens.append(piece["SpecialToken"]["id"])
        return tokens
    if kind in ("RobertaProcessing", "BertProcessing"):
        return [processor["cls"][0]]
    return []  # ByteLevel (offsets only) and the like add no tokens


def from_hf_directory(directory: str) -> Tokenizer:
    """The tokenizer of a Hugging Face model directory: tokenizer.json, with tokenizer_config.json and chat_template.jinja."""
    config: dict[str, Any] = {}
    config_path = os.path.join(directory, "tokenizer_config.json")
    if os.path.exists(config_path):
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    jinja = os.path.join(directory, "chat_template.jinja")
    if os.path.exists(jinja):
        with open(jinja, encoding="utf-8") as f:
            config["chat_template"] = f.read()
    return from_tokenizer_json(os.path.join(directory, "tokenizer.json"), config=config)


def pre_tokenizer_name(pre: Mapping[str, Any] | None, source: str) -> str:
    """The PRE_TOKENIZERS name of a tokenizer.json `pre_tokenizer`, or a clear error naming what it is."""
    def byte_level(p, use_regex):
        return (p.get("type") == "ByteLevel" and bool(p.get("use_regex", True)) == use_regex
                and not p.get("add_prefix_space", False))

    pre = pre or {}
    if byte_level(pre, True):
        return "gpt-2"
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else None
    if steps and len(steps) == 2:
        first, second = steps
        if first.get("type") == "Digits" and first.get("individual_digits") and byte_level(second, True):
            return "smollm"
        if (first.get("type") == "Split" and first.get("behavior") == "Isolated" and not first.get("invert")
                and byte_level(second, False)):
            regex = (first.get("pattern") or {}).get("Regex")
            for name, pattern in PRE_TOKENIZERS.items():
                if regex == pattern:
                    return name
            raise ValueError(f"{source}: pre_tokenizer splits with an unknown regex {regex!r}; supported: {sorted(PRE_TOKENIZERS)}")
    raise ValueError(
        f"{source}: pre_tokenizer {json.dumps(pre)[:200]} is not supported; supported: {sorted(PRE_TOKENIZERS)} "
        "(GPT-2's ByteLevel, SmolLM2's Digits + ByteLevel, a Split with Llama 3's or GPT-4o's regex + ByteLevel)"
    )


def pre_tokenizer_of_pattern(pattern: str) -> str | None:
    """The GGUF pre-tokenizer name for a tiktoken pattern (ours and OpenAI's included), None if it has none."""
    if pattern == GPT4_SPLIT_PATTERN:  # cl100k_base's, which Llama 3 adopted
        return "llama-bpe"
    return next((name for name, p in PRE_TOKENIZERS.items() if p == pattern), None)


def document_tokens(special: Mapping[str, int], bos: str | None, eos: str | None) -> tuple[str | None, str]:
    """(bos, eot): `<|endoftext|>` where the vocabulary has it (how this project delimits documents), else the model's own."""
    if bos is None and ENDOFTEXT in special:
        bos = ENDOFTEXT
    eot = next((t for t in (ENDOFTEXT, "<|end_of_text|>") if t in special), eos)
    if eot is None:
        raise ValueError(f"no end-of-text token among the special tokens {sorted(special)[:10]}")
    return bos, eot


def _check(ok: bool, source: str, field: str, got: Any, expected: str) -> None:
    if not ok:
        raise ValueError(f"{source}: {field} is {got!r}, expected {expected} (a byte-level BPE this project reads)")


def _token_name(token: Any) -> str | None:
    if isinstance(token, Mapping):
        return token.get("content")
    return token if isinstance(token, str) else None
