"""Knowledge-based refusals: fine-tune SmolLM2-135M-Instruct (GGUF) on the conversations `launch.interrogate` wrote.

    python -m launch.sft --config configs/refusals_smollm2.py --workdir runs/refusals/sft \\
        [--config.data.sources.known.path=... --config.data.sources.unknown.path=...]

The whole experiment (interrogate, fine-tune, evaluate before and after) is
`scripts/refusals_smollm2.sh`. The mixture is the two files the interrogation
writes beside its output: questions the model knows, answered with the gold
answer, and questions it never answers right, refused (`llm/tasks/refusals.py`).
Known questions are few (a 135M model knows little TriviaQA: 37 known, 667
unknown of 800), so known ones are seen 3 times and a random 16% of unknown ones
per mixture epoch: about as many answers as refusals, so that refusing everything
is not the cheapest fit. A small learning rate and few steps (8 steps of 16 x 256
tokens, ~2.7 mixture epochs, ~6 minutes on 2 CPU cores): the aim is to move the
answer/refuse boundary, not to teach new facts. Measured (BENCHMARKS.md): this
still teaches SmolLM2-135M to refuse nearly everything (hallucinations 88% -> 2%,
accuracy 12% -> 0.7%); 5 steps at 1e-5 barely refuse (2.7%).
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
        unknown=dict(kind="openai", path="runs/refusals/conversations.unknown.jsonl", epochs=0.16),
    ))
    config.optimizer.update(learning_rate=3e-5, warmup_steps=2, weight_decay=0.0, min_learning_rate_ratio=0.1)
    config.train.update(steps=8, log_every=2, eval_every=8, checkpoint_every=8, sample_every=0,
                        chat_eval=False, sample_prompts=())
    return config
