"""Knowledge-based refusals: fine-tune SmolLM2-135M-Instruct (GGUF) on the conversations `launch.interrogate` wrote.

    python -m launch.sft --config configs/refusals_smollm2.py --workdir runs/refusals/sft \\
        [--config.data.sources.known.path=... (and unsure, unknown: the interrogation's side files)]

The whole experiment (interrogate, fine-tune, evaluate before and after) is
`scripts/refusals_smollm2.sh`. The mixture is the three files the interrogation
writes beside its output (`llm/tasks/refusals.py`): questions the model knows and
ones it is unsure of (right in some samples), both answered in the model's own
words, and questions it never answers right, refused. A 135M model knows little
TriviaQA (most interrogated questions come out unknown), so known ones are seen
6 times, unsure ones 3 times and a random 35% of unknown ones per mixture epoch:
mostly answers, because greedy decoding answers only where the answer is the
likelier first token, and a balanced mixture refuses nearly everything. A small
learning rate and few steps (24 steps of 16 x 256 tokens, ~1.5 mixture epochs):
the aim is to move the answer/refuse boundary, not to teach new facts. The
figures, the goal (hallucinations halved, accuracy within 1 point) and the probe
of `scripts/refusal_probe.py` that bounds what fine-tuning can reach are in
docs/experiments/refusals.md. No chat figures (no identity or GSM8K prompts):
the refusal figures are measured afterwards by `launch.interrogate --evaluate`.
"""

import ml_collections

from llm.stages.sft import base_sft_config


def get_config():
    config = base_sft_config(model="tiny", sharding="fsdp")  # the model comes from init_from
    config.init_from = "../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf"
    config.data.update(seq_len=256, batch_size=16, val_fraction=0.05, pack_window=512)
    config.data.sources = ml_collections.ConfigDict(dict(
        known=dict(kind="openai", path="runs/refusals/conversations.known.jsonl", epochs=6.0),
        unsure=dict(kind="openai", path="runs/refusals/conversations.unsure.jsonl", epochs=3.0),
        unknown=dict(kind="openai", path="runs/refusals/conversations.unknown.jsonl", epochs=0.35),
    ))
    config.optimizer.update(learning_rate=2e-5, warmup_steps=2, weight_decay=0.0, min_learning_rate_ratio=0.1)
    config.train.update(steps=24, log_every=2, eval_every=24, checkpoint_every=24, sample_every=0,
                        chat_eval=False, sample_prompts=())
    return config
