"""Hugging Face interchange: GPT-2 and Llama safetensors checkpoints <-> our params.

    cfg, params = load_hf("openai-community/gpt2")      # a hub id, or a local directory
    save_hf(cfg, params, "out/")                        # transformers.AutoModelForCausalLM loads it

Only the weights and `config.json` cross the boundary; tokenizers are handled by
`llm/tokenizer.py`. Our layout keeps heads as their own axis (`q: [L, D, N, H]`),
Hugging Face flattens them (`q_proj.weight: [N*H, D]`, GPT-2's fused
`c_attn.weight: [D, 3*D]` in `Conv1D`'s input-major order), so conversion is
reshapes and transposes, nothing else.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from llm.config import ModelConfig
from llm.model import ParamSpec, param_specs

Params = dict[str, Any]
# A model's config, weights and the tokenizer files `load_release` reads.
_WEIGHT_PATTERNS = ["config.json", "*.safetensors", "*.safetensors.index.json", "tokenizer.json",
                    "tokenizer_config.json", "chat_template.jinja"]


# ----------------------------------------------------------------------------- files


def resolve_checkpoint_dir(path_or_repo: str, revision: str | None = None) -> str:
    """A local directory as is; otherwise the hub repo's config and safetensors, fetched into the HF cache."""
    if os.path.isdir(path_or_repo):
        return path_or_repo
    if os.path.exists(path_or_repo) or path_or_repo.startswith((".", "/")):
        raise FileNotFoundError(f"{path_or_repo!r} is not a checkpoint directory")
    import huggingface_hub

    try:
        return huggingface_hub.snapshot_download(path_or_repo, revision=revision, allow_patterns=_WEIGHT_PATTERNS)
    except Exception as e:  # offline, unknown repo, gated model: say which and why
        raise RuntimeError(
            f"could not fetch {path_or_repo!r} from the Hugging Face hub ({type(e).__name__}: {e}). "
            "Offline? Pass a local directory holding config.json and *.safetensors instead."
        ) from e


def read_safetensors(directory: str) -> dict[str, np.ndarray]:
    """Every tensor of a (possibly sharded) safetensors checkpoint, as float32 numpy arrays."""
    from safetensors import safe_open

    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = sorted(name for name in os.listdir(directory) if name.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {directory}")
    tensors = {}
    # The "flax" reader understands bfloat16, which numpy's does not; keep it on the host.
    with jax.default_device(jax.devices("cpu")[0]):
        for name in files:
            with safe_open(os.path.join(directory, name), framework="flax") as f:
                for key in f.keys():
                    tensors[key] = np.asarray(f.get_tensor(key).astype(jnp.float32))
    return tensors


def load_hf(path_or_repo: str, *, revision: str | None = None, **model_overrides: Any) -> tuple[ModelConfig, Params]:
    """Our `(ModelConfig, params)` for a GPT-2 or Llama checkpoint; `model_overrides` set execution fields."""
    directory = resolve_checkpoint_dir(path_or_repo, revision)
    with open(os.path.join(directory, "config.json")) as f:
        hf_config = json.load(f)
    cfg = model_config_from_hf(hf_config, **model_overrides)
    params = params_from_hf(cfg, read_safetensors(directory))
    return cfg, jax.tree.map(jnp.asarray, params)


def save_hf(cfg: ModelConfig, params: Params, directory: str) -> None:
    """Writes `config.json` and `model.safetensors` that `transformers` loads as the matching model."""
    from safetensors.numpy import save_file

    os.makedirs(directory, exist_ok=True)
    tensors = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in params_to_hf(cfg, params).items()}
    save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(hf_config_from_model(cfg), f, indent=2)


# ----------------------------------------------------------------------------- configs


def model_config_from_hf(hf: Mapping[str, Any], **overrides: Any) -> ModelConfig:
    """Translates a `transformers` config.json (GPT-2 or Llama) into a `ModelConfig`."""
    model_type = hf.get("model_type")
    if model_type == "gpt2":
        _require(hf.get("activation_function", "gelu_new") in ("gelu_new", "gelu_pytorch_tanh"),
                 f"GPT-2 activation {hf.get('activation_function')!r} (only tanh-GELU is supported)")
        _require(not hf.get("scale_attn_by_inverse_layer_idx") and not hf.get("reorder_and_upcast_attn"),
                 "GPT-2 attention variants scale_attn_by_inverse_layer_idx / reorder_and_upcast_attn")
        _require(hf.get("scale_attn_weights", True), "GPT-2 without scale_attn_weights")
        fields = dict(
            family="gpt2", vocab_size=hf["vocab_size"], n_layer=hf["n_layer"], n_embd=hf["n_embd"],
            n_head=hf["n_head"], n_kv_head=hf["n_head"], mlp_dim=hf.get("n_inner") or 4 * hf["n_embd"],
            max_seq_len=hf["n_positions"], norm_eps=hf.get("layer_norm_epsilon", 1e-5),
            tie_embeddings=hf.get("tie_word_embeddings", True),
        )
        _require(fields["tie_embeddings"], "GPT-2 with untied embeddings")
    elif model_type == "llama":
        _require(hf.get("hidden_act", "silu") == "silu", f"Llama activation {hf.get('hidden_act')!r}")
        _require(not hf.get("attention_bias") and not hf.get("mlp_bias"), "Llama with attention or MLP biases")
        head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
        _require(head_dim * hf["num_attention_heads"] == hf["hidden_size"],
                 f"Llama head_dim {head_dim} != hidden_size / num_attention_heads")
        # transformers 5 folds rope_theta into rope_parameters; older configs use rope_scaling.
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        rope_theta = rope.get("rope_theta", hf.get("rope_theta", 10_000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        _require(rope_type in ("default", "llama3"), f"RoPE scaling type {rope_type!r} (default and llama3 are)")
        scaling = {}
        if rope_type == "llama3":
            scaling = dict(
                rope_factor=float(rope["factor"]), rope_low_freq_factor=float(rope["low_freq_factor"]),
                rope_high_freq_factor=float(rope["high_freq_factor"]),
                rope_original_max_len=int(rope["original_max_position_embeddings"]),
            )
        fields = dict(
            family="llama", vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"], n_embd=hf["hidden_size"],
            n_head=hf["num_attention_heads"],
            n_kv_head=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            mlp_dim=hf["intermediate_size"], max_seq_len=hf.get("max_position_embeddings", 2048),
            norm_eps=hf.get("rms_norm_eps", 1e-6), tie_embeddings=hf.get("tie_word_embeddings", False),
            rope_theta=float(rope_theta), **scaling,
        )
    else:
        raise ValueError(f"unsupported Hugging Face model_type {model_type!r}; supported: 'gpt2', 'llama'")
    return ModelConfig(**{**fields, **overrides})


def hf_config_from_model(cfg: ModelConfig) -> dict[str, Any]:
    """The `transformers` config.json for our model (GPT2LMHeadModel or LlamaForCausalLM)."""
    if cfg.qk_norm or cfg.logit_softcap:
        raise ValueError("qk_norm and logit_softcap have no GPT-2/Llama equivalent in transformers; cannot export")
    if cfg.family == "gpt2":
        if cfg.n_kv_head != cfg.n_head:
            raise ValueError("GPT-2 in transformers has no grouped-query attention; cannot export n_kv_head < n_head")
        return dict(
            model_type="gpt2", architectures=["GPT2LMHeadModel"], vocab_size=cfg.vocab_size,
            n_positions=cfg.max_seq_len, n_embd=cfg.n_embd, n_layer=cfg.n_layer, n_head=cfg.n_head,
            n_inner=cfg.mlp_dim, activation_function="gelu_new", layer_norm_epsilon=cfg.norm_eps,
            tie_word_embeddings=True, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        )
    rope = dict(rope_type="default", rope_theta=cfg.rope_theta)
    if cfg.rope_factor != 1.0:
        rope = dict(
            rope_type="llama3", rope_theta=cfg.rope_theta, factor=cfg.rope_factor,
            low_freq_factor=cfg.rope_low_freq_factor, high_freq_factor=cfg.rope_high_freq_factor,
            original_max_position_embeddings=cfg.rope_original_max_len,
        )
    return dict(
        model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=cfg.vocab_size,
        hidden_size=cfg.n_embd, intermediate_size=cfg.mlp_dim, num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head, head_dim=cfg.head_dim,
        hidden_act="silu", max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings, attention_bias=False, mlp_bias=False,
        # Both spellings, so transformers 4 (rope_scaling + rope_theta) and 5 (rope_parameters) agree.
        rope_parameters=rope, rope_theta=cfg.rope_theta, rope_scaling=rope if cfg.rope_factor != 1.0 else None,
    )


def _require(ok: bool, what: str) -> None:
    if not ok:
        raise ValueError(f"unsupported checkpoint: {what}")


# ----------------------------------------------------------------------------- weights


def params_from_hf(cfg: ModelConfig, tensors: Mapping[str, np.ndarray]) -> Params:
    """Our params pytree from a Hugging Face state dict (numpy arrays)."""
    # GPT2LMHeadModel saves under "transformer."; the original hub files have no prefix.
    t = {k.removeprefix("transformer.").removeprefix("model."): v for k, v in tensors.items()}
    L, D, N, K, H = cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.head_dim

    def stack(fmt: str, fn=lambda w: w) -> np.ndarray:
        return np.stack([fn(_take(t, fmt.format(i))) for i in range(L)])

    if cfg.family == "gpt2":
        qkv_w = stack("h.{}.attn.c_attn.weight")  # [L, D, 3D]
        qkv_b = stack("h.{}.attn.c_attn.bias")  # [L, 3D]
        params = {
            "embed": _take(t, "wte.weight"),
            "pos_embed": _take(t, "wpe.weight"),
            "blocks": {
                "attn_norm": {"scale": stack("h.{}.ln_1.weight"), "bias": stack("h.{}.ln_1.bias")},
                "attn": {
                    "q": qkv_w[:, :, :D].reshape(L, D, N, H),
                    "k": qkv_w[:, :, D:2 * D].reshape(L, D, N, H),
                    "v": qkv_w[:, :, 2 * D:].reshape(L, D, N, H),
                    "o": stack("h.{}.attn.c_proj.weight").reshape(L, N, H, D),
                    "q_bias": qkv_b[:, :D].reshape(L, N, H),
                    "k_bias": qkv_b[:, D:2 * D].reshape(L, N, H),
                    "v_bias": qkv_b[:, 2 * D:].reshape(L, N, H),
                    "o_bias": stack("h.{}.attn.c_proj.bias"),
                },
                "mlp_norm": {"scale": stack("h.{}.ln_2.weight"), "bias": stack("h.{}.ln_2.bias")},
                "mlp": {
                    "fc": stack("h.{}.mlp.c_fc.weight"),
                    "fc_bias": stack("h.{}.mlp.c_fc.bias"),
                    "proj": stack("h.{}.mlp.c_proj.weight"),
                    "proj_bias": stack("h.{}.mlp.c_proj.bias"),
                },
            },
            "final_norm": {"scale": _take(t, "ln_f.weight"), "bias": _take(t, "ln_f.bias")},
        }
    else:
        layer = "layers.{}."
        params = {
            "embed": _take(t, "embed_tokens.weight"),
            "blocks": {
                "attn_norm": {"scale": stack(layer + "input_layernorm.weight")},
                "attn": {
                    "q": stack(layer + "self_attn.q_proj.weight", lambda w: w.T.reshape(D, N, H)),
                    "k": stack(layer + "self_attn.k_proj.weight", lambda w: w.T.reshape(D, K, H)),
                    "v": stack(layer + "self_attn.v_proj.weight", lambda w: w.T.reshape(D, K, H)),
                    "o": stack(layer + "self_attn.o_proj.weight", lambda w: w.T.reshape(N, H, D)),
                },
                "mlp_norm": {"scale": stack(layer + "post_attention_layernorm.weight")},
                "mlp": {
                    "gate": stack(layer + "mlp.gate_proj.weight", np.transpose),
                    "up": stack(layer + "mlp.up_proj.weight", np.transpose),
                    "down": stack(layer + "mlp.down_proj.weight", np.transpose),
                },
            },
            "final_norm": {"scale": _take(t, "norm.weight")},
        }
        if not cfg.tie_embeddings:
            params["lm_head"] = _take(t, "lm_head.weight").T
    _check_shapes(cfg, params)
    return params


def params_to_hf(cfg: ModelConfig, params: Params) -> dict[str, np.ndarray]:
    """The Hugging Face state dict (numpy, float32) for our params; the inverse of `params_from_hf`."""
    p = jax.tree.map(lambda a: np.asarray(a, dtype=np.float32), params)
    b = p["blocks"]
    L, D = cfg.n_layer, cfg.n_embd
    out: dict[str, np.ndarray] = {}
    if cfg.family == "gpt2":
        out["transformer.wte.weight"] = p["embed"]
        out["transformer.wpe.weight"] = p["pos_embed"]
        out["transformer.ln_f.weight"] = p["final_norm"]["scale"]
        out["transformer.ln_f.bias"] = p["final_norm"]["bias"]
        a, m = b["attn"], b["mlp"]
        for i in range(L):
            h = f"transformer.h.{i}."
            out[h + "ln_1.weight"], out[h + "ln_1.bias"] = b["attn_norm"]["scale"][i], b["attn_norm"]["bias"][i]
            out[h + "ln_2.weight"], out[h + "ln_2.bias"] = b["mlp_norm"]["scale"][i], b["mlp_norm"]["bias"][i]
            out[h + "attn.c_attn.weight"] = np.concatenate([a[n][i].reshape(D, D) for n in "qkv"], axis=1)
            out[h + "attn.c_attn.bias"] = np.concatenate([a[n + "_bias"][i].reshape(D) for n in "qkv"])
            out[h + "attn.c_proj.weight"] = a["o"][i].reshape(D, D)
            out[h + "attn.c_proj.bias"] = a["o_bias"][i]
            out[h + "mlp.c_fc.weight"], out[h + "mlp.c_fc.bias"] = m["fc"][i], m["fc_bias"][i]
            out[h + "mlp.c_proj.weight"], out[h + "mlp.c_proj.bias"] = m["proj"][i], m["proj_bias"][i]
    else:
        out["model.embed_tokens.weight"] = p["embed"]
        out["model.norm.weight"] = p["final_norm"]["scale"]
        if not cfg.tie_embeddings:
            out["lm_head.weight"] = p["lm_head"].T
        a, m = b["attn"], b["mlp"]
        for i in range(L):
            h = f"model.layers.{i}."
            out[h + "input_layernorm.weight"] = b["attn_norm"]["scale"][i]
            out[h + "post_attention_layernorm.weight"] = b["mlp_norm"]["scale"][i]
            for n in "qkv":
                out[h + f"self_attn.{n}_proj.weight"] = a[n][i].reshape(D, -1).T
            out[h + "self_attn.o_proj.weight"] = a["o"][i].reshape(-1, D).T
            for n in ("gate", "up", "down"):
                out[h + f"mlp.{n}_proj.weight"] = m[n][i].T
    return out


def _take(tensors: Mapping[str, np.ndarray], key: str) -> np.ndarray:
    if key not in tensors:
        raise KeyError(f"checkpoint has no tensor {key!r} (has e.g. {sorted(tensors)[:5]})")
    return tensors[key]


def _check_shapes(cfg: ModelConfig, params: Params) -> None:
    leaves = jax.tree_util.tree_leaves_with_path
    expected = {
        jax.tree_util.keystr(k): spec.shape
        for k, spec in leaves(param_specs(cfg), is_leaf=lambda x: isinstance(x, ParamSpec))
    }
    got = {jax.tree_util.keystr(k): np.shape(a) for k, a in leaves(params)}
    if expected != got:
        problems = [
            f"{k}: checkpoint {got.get(k, 'missing')}, config {expected.get(k, 'missing')}"
            for k in sorted(expected.keys() | got.keys())
            if expected.get(k) != got.get(k)
        ]
        raise ValueError(f"checkpoint tensors do not match its config.json: {problems}")
