"""Supervised fine-tuning of a real model, SmolLM2-135M-Instruct (GGUF), in its own chat format (ChatML).

    python -m launch.sft --config configs/sft_smollm2.py --workdir runs/sft_smollm2 [--config.train.steps=50 ...]

`init_from` loads the GGUF file (a local path or a hub id, `owner/repo/file.gguf`)
with its tokenizer and chat template; conversations render in that format, with its
default system message. Its vocabulary has no tool tokens, so the GSM8K calculator
conversations could not be rendered (they would be dropped and counted); the
mixture is human conversations, identity and letter counting. 135M parameters: on
CPU a run of a few dozen steps is a demonstration.
"""

from llm.stages.sft import base_sft_config


def get_config():
    config = base_sft_config(model="tiny", sharding="fsdp")  # the model comes from init_from
    config.init_from = "../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf"
    config.data.update(seq_len=512, batch_size=8)
    del config.data.sources["gsm8k"]
    config.data.sources.identity.update(name="SmolLM", creator="Hugging Face")
    config.optimizer.update(learning_rate=2e-5, warmup_steps=10, weight_decay=0.0)
    config.train.update(steps=100, log_every=5, eval_every=50, checkpoint_every=50, sample_every=50,
                        sample_tokens=64, chat_eval_gsm8k="", chat_eval_tokens=96)
    return config
