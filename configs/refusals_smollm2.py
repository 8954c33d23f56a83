"""Knowledge-based refusals: fine-tune SmolLM2-135M-Instruct (GGUF) on the conversations `launch.interrogate` wrote.

    python -m launch.sft --config configs/refusals_smollm2.py --workdir runs/refusals/sft \\
        [--config.data.sources.known.path=... --config.data.sources.unknown.path=...]

The whole experiment (interrogate, fine-tune, evaluate before and after) is
`scripts/refusals_smollm2.sh`. The mixture is the two files the interrogation
writes beside its output: questions the model knows, answered with the gold
answer, and questions it never answers right, refused (`llm/tasks/refusals.py`).
Known questions are few (a 135M model knows little TriviaQA), so they are seen
`known.epochs` times per mixture epoch, to keep the model answering what it
knows instead of learning to refuse everything. A small learning rate and few
steps: the aim is to move the answer/refuse boundary, not to teach new facts.
No chat figures (no identity or GSM8K prompts): the refusal figures are
measured afterwards by `launch.interrogate --evaluate`.
"""

import ml_collections

from llm.stages.sft import base_sft_config


def get_config():
    config = base_sft_config(model="tiny", sharding="fsdp")  # the model comes from init_from
    config.init_from = "../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf"
    config.data.update(seq_len=256, batch_size=16, val_fraction=0.05, pack_window=512)
    config.data.sources = ml_collections.ConfigDict(dict(
        known=dict(kind="openai", path="runs/refusals/conversations.known.jsonl", epochs=3.0),
        unknown=dict(kind="openai", path="runs/refusals/conversations.unknown.jsonl", epochs=0.5),
    ))
    config.optimizer.update(learning_rate=5e-5, warmup_steps=2, weight_decay=0.0, min_learning_rate_ratio=0.1)
    config.train.update(steps=14, log_every=2, eval_every=14, checkpoint_every=14, sample_every=0,
                        chat_eval=False, sample_prompts=())
    return config
