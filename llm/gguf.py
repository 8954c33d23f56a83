"""GGUF (llama.cpp, LM Studio) in: model config, params and tokenizer; `llm.gguf_export` writes them out.

    cfg, params, tokenizer = load_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")   # or "owner/repo/file.gguf" on the hub
    gguf_export.save_gguf("model.gguf", cfg, params, tokenizer, dtype="q8_0")   # llama.cpp and LM Studio run it

Reading and writing go through the `gguf` package (its reader, writer and
`gguf.quants`); quantized tensors are dequantized to float32 on load. Tensors map
to Hugging Face's names and then through `llm/hf.py`, so GGUF needs no layout
code of its own beyond llama.cpp's two conventions: GPT-2 matrices are stored
output-major (the transpose of GPT-2's `Conv1D`), and Llama's query and key rows
are permuted so that RoPE rotates adjacent pairs (llama.cpp) instead of the two
halves of a head (Hugging Face, and this project). The Llama-3.1 RoPE scaling
travels as llama.cpp's `rope_freqs` tensor (one divisor per frequency); its
parameters are written beside it under `llm.*` keys, and recovered from the
tensor when a file has no such keys.

The tokenizer is the file's byte-level BPE (`tokenizer.ggml.*`) converted to a
tiktoken encoding (`llm/hf_tokenizer.py`) and its chat template read as data
(`chat_jinja.derive`); our own format is kept exactly under `llm.chat_template`.
A prompt starts with the file's BOS iff `tokenizer.ggml.add_bos_token`, as in
llama.cpp (`Tokenizer.prompt_start`); an export writes that flag from ours.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from llm import hf, hf_tokenizer, model
from llm.chat_format import ChatTemplate
from llm.config import ModelConfig
from llm.tokenizer import Tokenizer

ARCHITECTURES = ("llama", "gpt2")
# Tensor types read (dequantized to float32); `gguf_export.WRITE_TYPES` are written.
READ_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")

LLAMA_NAMES = {  # Hugging Face (after "model.") -> GGUF
    "embed_tokens.weight": "token_embd.weight",
    "norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
GPT2_NAMES = {  # Hugging Face (after "transformer.") -> GGUF
    "wte.weight": "token_embd.weight",
    "wpe.weight": "position_embd.weight",
    "ln_f.weight": "output_norm.weight",
    "ln_f.bias": "output_norm.bias",
    "ln_1.weight": "attn_norm.weight",
    "ln_1.bias": "attn_norm.bias",
    "attn.c_attn.weight": "attn_qkv.weight",
    "attn.c_attn.bias": "attn_qkv.bias",
    "attn.c_proj.weight": "attn_output.weight",
    "attn.c_proj.bias": "attn_output.bias",
    "ln_2.weight": "ffn_norm.weight",
    "ln_2.bias": "ffn_norm.bias",
    "mlp.c_fc.weight": "ffn_up.weight",
    "mlp.c_fc.bias": "ffn_up.bias",
    "mlp.c_proj.weight": "ffn_down.weight",
    "mlp.c_proj.bias": "ffn_down.bias",
}
GPT2_TRANSPOSED = ("attn_qkv.weight", "attn_output.weight", "ffn_up.weight", "ffn_down.weight")


class GGUFError(ValueError):
    """A GGUF file this project cannot read; the message names the file and the field."""


# ----------------------------------------------------------------------------- files


def resolve_gguf(source: str, revision: str | None = None) -> str:
    """A local `.gguf` path as is; a hub file (`owner/repo/file.gguf`, or `owner/repo[:QUANT]` of a GGUF repo) downloaded."""
    if os.path.isfile(source):
        return source
    # A path whose first folder exists here is local, though it has a hub id's shape (runs/x/model.gguf).
    if source.startswith((".", "/", "~")) or os.path.exists(source) or source.count("/") < 1 or os.path.isdir(
            source.split("/")[0]):
        raise FileNotFoundError(f"no GGUF file at {source}")
    import huggingface_hub

    parts = source.split("/")
    repo, filename = "/".join(parts[:2]), "/".join(parts[2:]) or None
    quant = None
    if ":" in repo:
        repo, quant = repo.split(":", 1)
    try:
        files = [] if filename else [f for f in huggingface_hub.list_repo_files(repo, revision=revision)
                                     if f.endswith(".gguf")]
        chosen = [filename] if filename else [
            f for f in files if quant is None or quant.lower() in os.path.basename(f).lower()]
        if len(chosen) == 1:
            return huggingface_hub.hf_hub_download(repo, chosen[0], revision=revision)
    except Exception as e:  # offline, unknown repo, gated model: say which and why
        raise RuntimeError(
            f"could not fetch {source!r} from the Hugging Face hub ({type(e).__name__}: {e}). "
            "Offline? Pass a local .gguf file instead."
        ) from e
    raise FileNotFoundError(f"hub repo {repo} has {len(chosen)} GGUF files{f' matching {quant!r}' if quant else ''} "
                            f"({files[:10]}): name one as {repo}/FILE.gguf or {repo}:QUANT")


def is_gguf(source: str) -> bool:
    """Whether `load_release` should read `source` as GGUF: a .gguf path, or a hub id of a GGUF file or repo."""
    if source.endswith(".gguf"):
        return True
    repo = source.split(":", 1)[0]
    return not os.path.exists(source) and repo.count("/") == 1 and (":" in source or repo.lower().endswith("gguf"))


def read(path: str):
    """The `gguf.GGUFReader` of a file, with truncation and format errors naming the file."""
    import gguf

    if not os.path.isfile(path):
        raise FileNotFoundError(f"no GGUF file at {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise GGUFError(f"{path}: not a GGUF file (starts with {magic!r}, not b'GGUF')")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader memory-maps the file; a short one fails deep inside numpy
        raise GGUFError(f"{path}: unreadable GGUF, truncated or corrupt ({type(e).__name__}: {e})") from e


def metadata(reader) -> dict[str, Any]:
    """Every key/value of a GGUF file except the token arrays, as Python values."""
    skip = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type", "tokenizer.ggml.scores")
    return {key: field.contents() for key, field in reader.fields.items() if key not in skip}


# ----------------------------------------------------------------------------- reading


def load_gguf(source: str, *, tokenizer: str | None = None, **model_overrides: Any) -> tuple[ModelConfig, dict, Tokenizer]:
    """Our `(ModelConfig, params, Tokenizer)` of a GGUF file or hub id; `model_overrides` set execution fields."""
    path = resolve_gguf(source)
    reader = read(path)
    meta = metadata(reader)
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise GGUFError(f"{path}: general.architecture is {arch!r}; supported: {ARCHITECTURES}")
    tensors = {t.name: t for t in reader.tensors}
    cfg = model_config(path, meta, tensors, **model_overrides)
    params = hf.params_from_hf(cfg, _hf_tensors(path, cfg, tensors))
    tok = Tokenizer.load(tokenizer) if tokenizer else read_tokenizer(path, reader, meta)
    if tok.n_vocab > cfg.vocab_size:
        raise GGUFError(f"{path}: the tokenizer has {tok.n_vocab} ids but token_embd.weight only {cfg.vocab_size} rows")
    return cfg, jax.tree.map(jnp.asarray, params), tok


def model_config(path: str, meta: Mapping[str, Any], tensors: Mapping[str, Any], **overrides: Any) -> ModelConfig:
    """The ModelConfig of a GGUF file's metadata (and, for tying and RoPE scaling, its tensor list)."""
    arch = meta["general.architecture"]

    def get(key: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise GGUFError(f"{path}: metadata {arch}.{key} is missing")
        return value

    if "token_embd.weight" not in tensors:
        raise GGUFError(f"{path}: tensor token_embd.weight is missing")
    vocab_size = int(tensors["token_embd.weight"].shape[1])  # GGUF shapes are innermost-first: [D, V]
    n_embd, n_head = int(get("embedding_length")), int(get("attention.head_count"))
    fields = dict(
        vocab_size=vocab_size, n_layer=int(get("block_count")), n_embd=n_embd, n_head=n_head,
        mlp_dim=int(get("feed_forward_length")), max_seq_len=int(get("context_length")),
    )
    for key in ("attention.key_length", "attention.value_length"):
        if f"{arch}.{key}" in meta and int(meta[f"{arch}.{key}"]) != n_embd // n_head:
            raise GGUFError(f"{path}: {arch}.{key} = {meta[f'{arch}.{key}']}, this project needs embedding / heads "
                            f"= {n_embd // n_head}")
    if arch == "gpt2":
        fields.update(family="gpt2", n_kv_head=n_head, norm_eps=_f32(get("attention.layer_norm_epsilon", 1e-5)),
                      tie_embeddings=True)
    else:
        n_kv = get("attention.head_count_kv", n_head)
        if not isinstance(n_kv, (int, np.integer)):
            raise GGUFError(f"{path}: {arch}.attention.head_count_kv varies per layer ({n_kv}); not supported")
        rope_dim = int(get("rope.dimension_count", n_embd // n_head))
        if rope_dim != n_embd // n_head:
            raise GGUFError(f"{path}: {arch}.rope.dimension_count = {rope_dim} (partial RoPE) is not supported")
        scaling = meta.get(f"{arch}.rope.scaling.type", "none")
        if scaling not in ("none", None):
            raise GGUFError(f"{path}: {arch}.rope.scaling.type = {scaling!r} is not supported (only Llama-3.1 rope_freqs)")
        fields.update(family="llama", n_kv_head=int(n_kv), norm_eps=_f32(get("attention.layer_norm_rms_epsilon", 1e-5)),
                      rope_theta=float(get("rope.freq_base", 10_000.0)), tie_embeddings="output.weight" not in tensors)
        if "rope_freqs.weight" in tensors:
            factors = _dequantize(path, tensors["rope_freqs.weight"]).reshape(-1)
            fields.update(_rope_scaling(path, meta, factors, fields["rope_theta"], n_embd // n_head))
    return ModelConfig(**{**fields, **overrides})


def _f32(value: float) -> float:
    """A float32 from the file as the decimal it was written from (9.999999747e-06 -> 1e-05)."""
    return float(str(np.float32(value)))


def rope_factors(cfg: ModelConfig) -> np.ndarray:
    """llama.cpp's `rope_freqs`: per frequency, the divisor of the Llama-3.1 scaled RoPE (`model.rope_frequencies`)."""
    unscaled = model.rope_frequencies(dataclasses.replace(cfg, rope_factor=1.0))
    return np.asarray(unscaled / model.rope_frequencies(cfg), np.float32)


def _rope_scaling(path: str, meta: Mapping[str, Any], factors: np.ndarray, theta: float, head_dim: int) -> dict:
    """The Llama-3.1 RoPE parameters behind a `rope_freqs` tensor: from our `llm.*` keys, else fitted to it.

    The scaling depends on the original context only through original / low_freq_factor
    and original / high_freq_factor, so the fit fixes low_freq_factor = 1.
    """
    keys = ("rope_factor", "rope_low_freq_factor", "rope_high_freq_factor", "rope_original_max_len")
    if all(f"llm.{k}" in meta for k in keys):
        found = {k: meta[f"llm.{k}"] for k in keys}
        found["rope_original_max_len"] = int(found["rope_original_max_len"])
    else:
        factor = float(factors.max())
        freqs = 1.0 / theta ** (np.arange(len(factors)) * 2.0 / head_dim)
        mid = (factors > 1 + 1e-6) & (factors < factor - 1e-6)
        if factor <= 1 + 1e-6:
            return {}
        if mid.sum() < 2:
            raise GGUFError(f"{path}: tensor rope_freqs.weight has too few smoothed frequencies to recover the "
                            "Llama-3.1 RoPE scaling, and the file has no llm.rope_* keys")
        smooth = (1 / factors[mid] - 1 / factor) / (1 - 1 / factor)  # = original / wavelen - low, over high - low
        slope, intercept = np.polyfit(freqs[mid] / (2 * np.pi), smooth, 1)  # slope = orig/(h-l), intercept = -l/(h-l)
        high = 1 - 1 / intercept
        found = dict(rope_factor=factor, rope_low_freq_factor=1.0, rope_high_freq_factor=float(high),
                     rope_original_max_len=int(round(slope * (high - 1))))
    probe = ModelConfig(family="llama", vocab_size=1, n_layer=1, n_embd=head_dim, n_head=1, n_kv_head=1, mlp_dim=1,
                        max_seq_len=1, rope_theta=theta, **found)
    if not np.allclose(rope_factors(probe), factors, rtol=1e-3):
        raise GGUFError(f"{path}: tensor rope_freqs.weight is not a Llama-3.1 RoPE scaling this project can reproduce")
    return found


def _dequantize(path: str, tensor) -> np.ndarray:
    """A tensor as float32 in numpy order (outermost first)."""
    import gguf

    kind = tensor.tensor_type.name
    if kind not in READ_TYPES:
        raise GGUFError(f"{path}: tensor {tensor.name} has type {kind}; supported: {READ_TYPES}")
    shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))
    try:
        return np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), np.float32).reshape(shape)
    except Exception as e:
        raise GGUFError(f"{path}: tensor {tensor.name} ({kind}, shape {shape}) could not be dequantized: {e}") from e


def permute_rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Hugging Face query/key rows -> llama.cpp's: each head's two halves interleaved, as its RoPE rotates pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of `permute_rope_rows`."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_tensors(path: str, cfg: ModelConfig, tensors: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Every weight of a GGUF file under its Hugging Face name, dequantized, in Hugging Face layout."""
    names = LLAMA_NAMES if cfg.family == "llama" else GPT2_NAMES
    to_hf = {v: k for k, v in names.items()}
    prefix = "model." if cfg.family == "llama" else "transformer."
    out: dict[str, np.ndarray] = {}
    for name, tensor in tensors.items():
        if name == "rope_freqs.weight":
            continue  # read into the config
        if cfg.family == "gpt2" and name == "output.weight":
            # GPT-2 ties its head to token_embd; llama.cpp's converter stores a copy.
            if not np.array_equal(_dequantize(path, tensor), _dequantize(path, tensors["token_embd.weight"])):
                raise GGUFError(f"{path}: tensor output.weight differs from token_embd.weight; untied GPT-2 is not supported")
            continue
        match = re.fullmatch(r"blk\.(\d+)\.(.+)", name)
        base = match.group(2) if match else name
        if base not in to_hf:
            raise GGUFError(f"{path}: tensor {name} is not part of a {cfg.family} model this project knows")
        w = _dequantize(path, tensor)
        if cfg.family == "llama" and base in ("attn_q.weight", "attn_k.weight"):
            w = _unpermute(w, cfg.n_head if base == "attn_q.weight" else cfg.n_kv_head)
        if cfg.family == "gpt2" and base in GPT2_TRANSPOSED:
            w = w.T
        hf_name = to_hf[base]
        if match:  # a block's tensor: model.layers.{i}.… (Llama) or transformer.h.{i}.… (GPT-2)
            hf_name = ("layers." if cfg.family == "llama" else "h.") + f"{match.group(1)}.{hf_name}"
        out[hf_name if hf_name == "lm_head.weight" else prefix + hf_name] = w
    return out


def read_tokenizer(path: str, reader, meta: Mapping[str, Any]) -> Tokenizer:
    """The file's byte-level BPE (`tokenizer.ggml.*`) as a Tokenizer: chat template, document and prompt tokens.

    `meta` is `metadata(reader)`, read once by the caller.
    """
    fields = reader.fields

    def strings(key: str) -> list[str]:
        if key not in fields:
            raise GGUFError(f"{path}: metadata {key} is missing")
        return fields[key].contents()

    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise GGUFError(f"{path}: tokenizer.ggml.model is {kind!r}; only byte-level BPE ('gpt2') is supported")
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in hf_tokenizer.PRE_TOKENIZERS:
        raise GGUFError(f"{path}: tokenizer.ggml.pre is {pre!r}, a pre-tokenizer this project does not support "
                        f"(supported: {sorted(hf_tokenizer.PRE_TOKENIZERS)})")
    tokens = strings("tokenizer.ggml.tokens")
    types = list(fields["tokenizer.ggml.token_type"].contents()) if "tokenizer.ggml.token_type" in fields else [1] * len(tokens)
    merges = strings("tokenizer.ggml.merges") if "tokenizer.ggml.merges" in fields else []
    # Control (3) and user-defined (4) tokens are matched whole, never merged from bytes; unused (5) are padding.
    special = {token: i for i, (token, kind) in enumerate(zip(tokens, types)) if kind in (3, 4, 5)}
    names = {i: t for t, i in special.items()}
    bos_id, eos_id = meta.get("tokenizer.ggml.bos_token_id"), meta.get("tokenizer.ggml.eos_token_id")
    ours = meta.get("llm.chat_template")
    if ours is not None:
        template = ChatTemplate(**json.loads(ours)) if ours != "null" else None
    elif isinstance(meta.get("tokenizer.chat_template"), str):
        template = hf_tokenizer.read_chat_template(meta["tokenizer.chat_template"], special, names.get(bos_id),
                                                   names.get(eos_id), path,
                                                   meta.get("general.name") or os.path.basename(path))
    else:
        template = None
    if "llm.eot" in meta:  # written by gguf_export.save_gguf: our own document tokens, exactly
        bos, eot = meta.get("llm.bos"), meta["llm.eot"]
    else:
        try:
            bos, eot = hf_tokenizer.document_tokens(
                special, names.get(bos_id) if meta.get("tokenizer.ggml.add_bos_token") else None, names.get(eos_id))
        except ValueError as e:
            raise GGUFError(f"{path}: tokenizer.ggml.eos_token_id: {e}") from None
    # A prompt starts as llama.cpp starts it; a file that does not say keeps our rule (document_start).
    add_bos = meta.get("tokenizer.ggml.add_bos_token")
    if add_bos and bos_id not in names:
        raise GGUFError(f"{path}: tokenizer.ggml.add_bos_token is true but tokenizer.ggml.bos_token_id ({bos_id}) "
                        "is not one of its control tokens")
    prompt_start = None if add_bos is None else [names[bos_id]] if add_bos else []
    return hf_tokenizer.from_vocab(tokens, merges, pre=pre, special=special, source=path, chat_template=template,
                                   bos=bos, eot=eot, prompt_start=prompt_start,
                                   name=meta.get("llm.tokenizer_name") or meta.get("general.name") or "gguf")
