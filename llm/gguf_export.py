"""A model out to GGUF (llama.cpp, LM Studio): config, params (f32, f16 or q8_0) and tokenizer.

    save_gguf("model.gguf", cfg, params, tokenizer, dtype="q8_0")

The inverse of `llm.gguf`'s reader, through the `gguf` package's writer: tensors
take llama.cpp's names and its two layout conventions (GPT-2 matrices
output-major, Llama's query and key rows permuted for llama.cpp's RoPE), the
Llama-3.1 RoPE scaling travels as `rope_freqs`, and the tokenizer as
`tokenizer.ggml.*` with our own chat format kept exactly under `llm.chat_template`.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from llm import hf, hf_tokenizer
from llm.config import ModelConfig
from llm.gguf import GPT2_NAMES, GPT2_TRANSPOSED, LLAMA_NAMES, permute_rope_rows, rope_factors
from llm.tokenizer import Tokenizer

WRITE_TYPES = ("f32", "f16", "q8_0")


def save_gguf(path: str, cfg: ModelConfig, params: Any, tokenizer: Tokenizer, *, dtype: str = "f32",
              name: str = "llm") -> None:
    """Writes a GGUF file llama.cpp runs: weights as `dtype` (f32, f16 or q8_0; norms, biases stay f32), tokenizer, chat template."""
    import gguf

    if dtype not in WRITE_TYPES:
        raise ValueError(f"GGUF dtype {dtype!r}: expected one of {WRITE_TYPES}")
    if cfg.qk_norm or cfg.logit_softcap:
        raise ValueError("qk_norm and logit_softcap have no llama.cpp GPT-2/Llama equivalent; cannot export to GGUF")
    if tokenizer.n_vocab > cfg.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.n_vocab} ids but the model only {cfg.vocab_size} logits")
    arch = cfg.family
    w = gguf.GGUFWriter(path, arch)
    w.add_name(name)
    w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                     "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.n_embd)
    w.add_block_count(cfg.n_layer)
    w.add_feed_forward_length(cfg.mlp_dim)
    w.add_head_count(cfg.n_head)
    w.add_vocab_size(cfg.vocab_size)
    if arch == "gpt2":
        if cfg.n_kv_head != cfg.n_head:
            raise ValueError("llama.cpp's GPT-2 has no grouped-query attention; cannot export n_kv_head < n_head")
        w.add_layer_norm_eps(cfg.norm_eps)
    else:
        w.add_head_count_kv(cfg.n_kv_head)
        w.add_layer_norm_rms_eps(cfg.norm_eps)
        w.add_rope_freq_base(cfg.rope_theta)
        w.add_rope_dimension_count(cfg.head_dim)
        if cfg.rope_factor != 1.0:
            w.add_tensor("rope_freqs.weight", rope_factors(cfg))
            for key in ("rope_factor", "rope_low_freq_factor", "rope_high_freq_factor"):
                w.add_float32(f"llm.{key}", getattr(cfg, key))
            w.add_uint32("llm.rope_original_max_len", cfg.rope_original_max_len)
    _add_tokenizer(w, cfg, tokenizer)
    for hf_name, tensor in hf.params_to_hf(cfg, params).items():
        gguf_name = _gguf_name(cfg, hf_name)
        base = gguf_name.split(".", 2)[-1] if gguf_name.startswith("blk.") else gguf_name
        if arch == "llama" and base in ("attn_q.weight", "attn_k.weight"):
            tensor = permute_rope_rows(tensor, cfg.n_head if base == "attn_q.weight" else cfg.n_kv_head)
        if arch == "gpt2" and base in GPT2_TRANSPOSED:
            tensor = tensor.T
        _add_weight(w, gguf_name, np.ascontiguousarray(tensor, np.float32), dtype)
    if arch == "gpt2":  # llama.cpp's GPT-2 converter stores the tied head; older llama.cpp builds require it
        _add_weight(w, "output.weight", np.ascontiguousarray(np.asarray(params["embed"], np.float32)), dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _gguf_name(cfg: ModelConfig, hf_name: str) -> str:
    if cfg.family == "llama":
        if hf_name == "lm_head.weight":
            return "output.weight"
        match = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", hf_name)
        return f"blk.{match.group(1)}.{LLAMA_NAMES[match.group(2)]}" if match else LLAMA_NAMES[hf_name.removeprefix("model.")]
    match = re.fullmatch(r"transformer\.h\.(\d+)\.(.+)", hf_name)
    return f"blk.{match.group(1)}.{GPT2_NAMES[match.group(2)]}" if match else GPT2_NAMES[hf_name.removeprefix("transformer.")]


def _add_weight(writer, name: str, tensor: np.ndarray, dtype: str) -> None:
    """Matrices as `dtype`; vectors (norms, biases) and position tables f32, as llama.cpp expects them."""
    import gguf

    if tensor.ndim < 2 or dtype == "f32" or name == "position_embd.weight":
        writer.add_tensor(name, tensor)
    elif dtype == "f16" or tensor.shape[-1] % 32:  # Q8_0 packs rows in blocks of 32; llama.cpp falls back the same way
        writer.add_tensor(name, tensor.astype(np.float16))
    else:
        qtype = gguf.GGMLQuantizationType.Q8_0
        writer.add_tensor(name, gguf.quants.quantize(tensor, qtype), raw_dtype=qtype)


def _add_tokenizer(writer, cfg: ModelConfig, tokenizer: Tokenizer) -> None:
    """The tiktoken encoding as llama.cpp's byte-level BPE: tokens by id, merges, types, pre-tokenizer, chat template."""
    enc = tokenizer.encoding
    pre = hf_tokenizer.pre_tokenizer_of_pattern(enc._pat_str)
    if pre is None:
        raise ValueError(f"tokenizer {tokenizer.name}: its split pattern has no llama.cpp pre-tokenizer "
                         f"(supported: {sorted(hf_tokenizer.PRE_TOKENIZERS)}); cannot export to GGUF")
    by_id: dict[int, bytes] = {rank: token for token, rank in enc._mergeable_ranks.items()}
    special = {i: t for t, i in enc._special_tokens.items()}
    tokens, types = [], []
    for i in range(cfg.vocab_size):  # every row of the embedding gets a token; gaps are padding
        if i in by_id:
            tokens.append(hf_tokenizer.token_string(by_id[i]))
            types.append(1)
        elif i in special:
            tokens.append(special[i])
            types.append(3)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(5)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(_merges(enc._mergeable_ranks))
    writer.add_eos_token_id(tokenizer.eot)
    # llama.cpp prepends tokenizer.ggml.bos_token_id iff add_bos_token: so a prompt starts as ours does.
    start = tokenizer.prompt_start
    if len(start) > 1:
        raise ValueError(f"tokenizer {tokenizer.name}: prompts start with {len(start)} tokens {start}; GGUF's "
                         "add_bos_token prepends one")
    bos_id = start[0] if start else tokenizer.bos[0] if tokenizer.bos else None
    if bos_id is not None:
        writer.add_bos_token_id(bos_id)
    writer.add_add_bos_token(bool(start))
    writer.add_string("llm.tokenizer_name", tokenizer.name)
    writer.add_string("llm.eot", tokenizer.eot_token)
    if tokenizer.bos_token is not None:
        writer.add_string("llm.bos", tokenizer.bos_token)
    template = tokenizer.chat_template
    writer.add_string("llm.chat_template", json.dumps(template and dataclasses.asdict(template)))
    if template is not None:
        writer.add_chat_template(template.to_jinja())
        writer.add_eot_token_id(tokenizer.end_of_turn)


def _merges(ranks: Mapping[bytes, int]) -> list[str]:
    """A merge list under which Hugging Face's and llama.cpp's BPE encode as tiktoken does.

    tiktoken merges the adjacent pair whose concatenation ranks lowest, whichever two
    parts it is made of; so every split of a token into two tokens is a merge, ordered
    by the rank of the result (as transformers' TikTokenConverter does).
    """
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in ranks and right in ranks and ranks[left] < rank and ranks[right] < rank:
                merges.append((rank, ranks[left], ranks[right], left, right))
    merges.sort()
    return [f"{hf_tokenizer.token_string(a)} {hf_tokenizer.token_string(b)}" for *_, a, b in merges]
