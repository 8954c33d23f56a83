"""Configs: ml_collections presets, command-line overrides, and the typed model config.

Experiment configs (`configs/*.py`) are code returning a `ConfigDict`; every field
can be overridden as `--config.model.n_layer=12`. The model itself takes a frozen
`ModelConfig` (hashable, so it can be a static argument of `jax.jit`), built from
`config.model` by `model_config`, which is also where invalid shapes are caught,
before anything is traced or compiled.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import os
import re
from typing import Any, Sequence

import ml_collections
from absl import flags
from ml_collections import config_flags

FAMILIES = ("gpt2", "llama")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
DTYPES = ("auto", "float32", "bfloat16", "float16")
ATTENTION_IMPLS = ("auto", "xla", "cudnn")
# ModelConfig fields that change how the model runs, never its parameters: a run may resume with others.
EXECUTION_FIELDS = ("scan_layers", "remat", "dtype", "attention_impl", "loss_chunk")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything that determines the Transformer's parameters and its forward pass."""

    family: str  # "gpt2": LayerNorm+bias, GELU, learned positions; "llama": RMSNorm, SwiGLU, RoPE
    vocab_size: int
    n_layer: int
    n_embd: int
    n_head: int
    n_kv_head: int  # < n_head is grouped-query attention
    mlp_dim: int
    max_seq_len: int
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    # RoPE (llama family). rope_factor == 1 disables the Llama-3.1 frequency scaling.
    rope_theta: float = 10_000.0
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_len: int = 8192
    # Modern knobs (both families): RMSNorm on queries and keys; tanh soft-cap of the logits.
    qk_norm: bool = False
    logit_softcap: float = 0.0  # 0 disables
    # Execution: none of these change the parameters.
    scan_layers: bool = True
    remat: str = "none"
    dtype: str = "auto"  # compute dtype; params stay float32. "auto": bf16 on GPU/TPU, f32 on CPU
    attention_impl: str = "auto"  # "auto" lets JAX pick (cuDNN flash attention on GPU where it applies)
    # Sequence positions per chunk of the loss's output head + log-softmax (llm/train/losses.py), so the
    # [B, T, V] logits are never held whole; 0: the full logits at once; -1 "auto": 0 on CPU, 128 on GPU/TPU.
    loss_chunk: int = -1
    init_std: float = 0.02

    def __post_init__(self):
        _check(self.family in FAMILIES, f"model.family must be one of {FAMILIES}, got {self.family!r}")
        for name in ("vocab_size", "n_layer", "n_embd", "n_head", "n_kv_head", "mlp_dim", "max_seq_len"):
            _check(getattr(self, name) > 0, f"model.{name} must be positive, got {getattr(self, name)}")
        _check(
            self.n_embd % self.n_head == 0,
            f"model.n_embd={self.n_embd} is not divisible by model.n_head={self.n_head}",
        )
        _check(
            self.n_head % self.n_kv_head == 0,
            f"model.n_head={self.n_head} is not divisible by model.n_kv_head={self.n_kv_head}",
        )
        _check(self.remat in REMAT_POLICIES, f"model.remat must be one of {REMAT_POLICIES}, got {self.remat!r}")
        _check(self.dtype in DTYPES, f"model.dtype must be one of {DTYPES}, got {self.dtype!r}")
        _check(
            self.attention_impl in ATTENTION_IMPLS,
            f"model.attention_impl must be one of {ATTENTION_IMPLS}, got {self.attention_impl!r}",
        )
        _check(self.loss_chunk >= -1, f"model.loss_chunk must be >= 0 (or -1, auto), got {self.loss_chunk}")
        _check(self.logit_softcap >= 0, f"model.logit_softcap must be >= 0, got {self.logit_softcap}")
        _check(self.rope_factor >= 1, f"model.rope_factor must be >= 1, got {self.rope_factor}")
        if self.family == "llama":
            _check(self.head_dim % 2 == 0, f"RoPE needs an even head_dim, got {self.head_dim}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


# Shapes of the published checkpoints. Parameter counts are pinned in tests/test_model.py.
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "gpt2_124m": dict(family="gpt2", vocab_size=50257, n_layer=12, n_embd=768, n_head=12, n_kv_head=12,
                      mlp_dim=3072, max_seq_len=1024),
    "gpt2_350m": dict(family="gpt2", vocab_size=50257, n_layer=24, n_embd=1024, n_head=16, n_kv_head=16,
                      mlp_dim=4096, max_seq_len=1024),
    "gpt2_774m": dict(family="gpt2", vocab_size=50257, n_layer=36, n_embd=1280, n_head=20, n_kv_head=20,
                      mlp_dim=5120, max_seq_len=1024),
    "gpt2_1558m": dict(family="gpt2", vocab_size=50257, n_layer=48, n_embd=1600, n_head=25, n_kv_head=25,
                       mlp_dim=6400, max_seq_len=1024),
    "llama32_1b": dict(family="llama", vocab_size=128256, n_layer=16, n_embd=2048, n_head=32, n_kv_head=8,
                       mlp_dim=8192, max_seq_len=131072, norm_eps=1e-5, tie_embeddings=True,
                       rope_theta=500_000.0, rope_factor=32.0, rope_low_freq_factor=1.0,
                       rope_high_freq_factor=4.0, rope_original_max_len=8192),
    "llama31_8b": dict(family="llama", vocab_size=128256, n_layer=32, n_embd=4096, n_head=32, n_kv_head=8,
                       mlp_dim=14336, max_seq_len=131072, norm_eps=1e-5, tie_embeddings=False,
                       rope_theta=500_000.0, rope_factor=8.0, rope_low_freq_factor=1.0,
                       rope_high_freq_factor=4.0, rope_original_max_len=8192),
    # A Llama-style model small enough to train on a laptop CPU in minutes.
    "tiny": dict(family="llama", vocab_size=4096, n_layer=4, n_embd=128, n_head=4, n_kv_head=2,
                 mlp_dim=384, max_seq_len=256, tie_embeddings=True, rope_theta=10_000.0),
}

# Logical axis -> mesh axes. Parameters and activations name their axes logically
# (see llm/model.py); a rule set decides how those names land on the mesh.
MESH_AXES = ("data", "fsdp", "tensor")
SHARDING_PRESETS: dict[str, dict[str, tuple[str, ...]]] = {
    # Pure data parallelism: replicated parameters, the batch split over every device.
    "dp": dict(batch=("data", "fsdp")),
    # ZeRO-3 style: parameters split along the model width over `fsdp`.
    "fsdp": dict(batch=("data", "fsdp"), embed=("fsdp",)),
    # FSDP plus Megatron-style tensor parallelism over heads, MLP hidden units and vocabulary.
    "fsdp_tp": dict(batch=("data", "fsdp"), embed=("fsdp",), heads=("tensor",), kv_heads=("tensor",),
                    mlp=("tensor",), vocab=("tensor",)),
}
LOGICAL_AXES = ("batch", "seq", "vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "layers")


def base_config(model: str = "tiny", sharding: str = "fsdp") -> ml_collections.ConfigDict:
    """The full experiment config with one model preset and one sharding rule set filled in."""
    if model not in MODEL_PRESETS:
        raise ValueError(f"unknown model preset {model!r}; choose from {sorted(MODEL_PRESETS)}")
    if sharding not in SHARDING_PRESETS:
        raise ValueError(f"unknown sharding preset {sharding!r}; choose from {sorted(SHARDING_PRESETS)}")
    model_fields = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
    model_fields.update(MODEL_PRESETS[model])
    rules = {axis: tuple(SHARDING_PRESETS[sharding].get(axis, ())) for axis in LOGICAL_AXES}
    config = ml_collections.ConfigDict(
        dict(
            seed=0,  # parameter init, data order and every step's random key
            # Start from released weights instead of a fresh init (params only, a new optimizer state): a release
            # directory, a Hugging Face directory or hub id, or a training workdir (its newest checkpoint).
            init_from="",
            model=model_fields,
            # Devices along each mesh axis; one -1 takes whatever the others leave.
            mesh=dict(data=-1, fsdp=1, tensor=1),
            sharding=rules,
            optimizer=dict(
                name="adamw",  # or "muon": Muon on the block matrices, AdamW on the rest
                learning_rate=6e-4,
                schedule="cosine",  # or "wsd": warmup, stable, then a linear decay over decay_fraction
                warmup_steps=100,
                total_steps=10_000,  # tied to train.steps below
                min_learning_rate_ratio=0.1,
                decay_fraction=0.2,
                b1=0.9,
                b2=0.95,
                eps=1e-8,
                weight_decay=0.1,  # on matrices only
                grad_clip=1.0,  # global norm; 0 disables
            ),
            data=dict(
                source="sample",  # "sample" (bundled), "fineweb[-edu][:SUBSET]", files/glob, or a prepared folder
                tokenizer="gpt2",  # a named encoding, a .tiktoken file, or "train:VOCAB" (our BPE, trained once)
                seq_len=MODEL_PRESETS[model]["max_seq_len"] if model.startswith("gpt2") or model == "tiny" else 2048,
                batch_size=8,  # sequences per optimizer step, over all processes
                packing="concat",  # or "bos_best_fit"
                val_fraction=0.01,
                worker_count=0,  # grain worker processes per host
                # Fixed data streams the global batch is drawn from; keep it when changing the number of
                # hosts and the batches stay the same. 0: one per process.
                num_shards=0,
            ),
            train=dict(
                steps=1000,
                grad_accum=1,  # micro-batches per step
                log_every=10,  # these three: 0 runs them only at the last step (evaluation: and step 0)
                eval_every=200,
                eval_batches=8,
                sample_every=0,  # 0: no samples during training
                sample_prompts=("The", "In the year"),
                sample_tokens=32,
                checkpoint_every=200,
                keep_checkpoints=3,
                peak_flops=0.0,  # per device, for MFU; 0 looks the device up (PEAK_FLOPS in llm/train/loop.py)
            ),
        )
    )
    config.optimizer.total_steps = config.train.get_ref("steps")
    return config


def model_config(config: ml_collections.ConfigDict) -> ModelConfig:
    """The typed, validated `ModelConfig` for `config.model`."""
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    given = dict(config.model)
    unknown = sorted(set(given) - fields)
    if unknown:
        raise ValueError(f"unknown model config keys {unknown}; known keys: {sorted(fields)}")
    return ModelConfig(**given)


_OVERRIDE = re.compile(r"^--?config\.([\w.]+)(=.*)?$")


def load_config(path: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """Loads `configs/*.py` and applies `--config.a.b=value` overrides, rejecting unknown keys.

    The same parser serves the command line (`launch/`) and notebooks:
    `load_config("configs/tiny.py", ["--config.model.n_layer=2"])`.
    """
    defaults = _import_config_module(path).get_config()
    for arg in overrides:
        match = _OVERRIDE.match(arg)
        if not match:
            raise ValueError(f"not a config override: {arg!r}; expected --config.key.path=value")
        _check_key_exists(defaults, match.group(1))
    argv = ["llm", f"--config={path}", *overrides]
    flag_values = flags.FlagValues()
    holder = config_flags.DEFINE_config_file("config", path, flag_values=flag_values, sys_argv=argv)
    flag_values(argv)
    return holder.value


def _import_config_module(path: str):
    spec = importlib.util.spec_from_file_location("_llm_config", path)
    if spec is None or not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _check_key_exists(config: ml_collections.ConfigDict, dotted: str) -> None:
    node: Any = config
    walked = []
    for key in dotted.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or key not in node:
            siblings = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
            hint = difflib.get_close_matches(key, siblings, n=1)
            where = ".".join(walked) or "the config"
            suggestion = f"; did you mean {'.'.join([*walked, hint[0]])!r}?" if hint else ""
            raise ValueError(f"unknown config key {dotted!r}: {where} has no field {key!r}{suggestion}")
        node = node[key]
        walked.append(key)


def config_from_argv(argv: Sequence[str]) -> tuple[ml_collections.ConfigDict, list[str]]:
    """Splits `--config PATH` and `--config.*=value` out of argv; returns the config and the other args."""
    path, overrides, rest = None, [], []
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg == "--config":
            if not args:
                raise ValueError("--config needs a path to a configs/*.py file")
            path = args.pop(0)
        elif arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        elif _OVERRIDE.match(arg.split("=", 1)[0]):
            if "=" not in arg:  # "--config.model.n_layer 12"
                if not args:
                    raise ValueError(f"{arg} needs a value")
                arg = f"{arg}={args.pop(0)}"
            overrides.append(arg)
        else:
            rest.append(arg)
    if path is None:
        raise ValueError("missing --config=configs/NAME.py")
    return load_config(path, overrides), rest
