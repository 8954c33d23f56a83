"""Supervised fine-tuning of the tiny model into a chat assistant, on CPU in minutes.

    python -m launch.sft --config configs/sft_tiny.py --workdir runs/sft [--config.train.steps=100 ...]

Starts from the main job's release (`python -m launch.train --config configs/tiny.py
--workdir runs/tiny` first); its 4k BPE already has the chat and tool tokens. The
mixture: human conversations (OpenAssistant oasst1, English validation trees),
GSM8K with calculator calls, identity conversations (who the assistant is) and the
letter-counting task; the data lives in ../shared/data (point the paths elsewhere
with --config.data.sources.NAME.path=...). Logs validation loss per source on
held-out conversations, greedy chat figures on held-out prompts and greedy samples;
`python -m launch.chat --checkpoint runs/sft/release` chats with the result.
"""

import ml_collections

from llm.config import base_config

DATA = "../shared/data"


def get_config():
    config = base_config(model="tiny", sharding="fsdp")
    config.init_from = "runs/tiny/release"
    config.data = ml_collections.ConfigDict(dict(
        tokenizer="",  # only for a fresh model (no init_from): a named encoding or a .tiktoken file
        seq_len=256,
        batch_size=16,
        val_fraction=0.1,  # of each source's conversations, by a hash of their keys
        pack_window=256,  # conversations packed together (best fit) at a time
        num_shards=0,
        # Each source: kind (openai, sharegpt, oasst, hub, gsm8k, identity, spelling), path, epochs per
        # mixture epoch (0.5: a random half), and the reader's own options.
        sources=dict(
            oasst=dict(kind="oasst", path=f"{DATA}/chat/oasst1_en_validation.jsonl", epochs=2.0),
            gsm8k=dict(kind="gsm8k", path=f"{DATA}/gsm8k/train.jsonl", epochs=0.1),
            identity=dict(kind="identity", epochs=3.0),
            spelling=dict(kind="spelling", path=f"{DATA}/words/words_alpha.zip", epochs=1.0, n=400),
        ),
        identity=dict(name="Tiny", creator="the llm project",
                      can="answer questions, chat, and do arithmetic with a calculator",
                      cannot="browse the internet, remember past conversations, or see images"),
        identity_held_out=20,  # paraphrases never trained on, asked at evaluation
    ))
    config.optimizer.update(learning_rate=1e-3, warmup_steps=10, weight_decay=0.0)
    config.train.update(
        steps=300, log_every=10, eval_every=100, checkpoint_every=100, sample_every=100, sample_tokens=64,
        sample_prompts=("What is your name?", "What is 12 times 7?", "How many times does the letter 'r' appear "
                        "in the word \"strawberry\"?"),
        chat_eval=True,  # greedy replies to held-out prompts at every evaluation
        chat_eval_questions=20,  # identity paraphrases and GSM8K test questions asked
        chat_eval_gsm8k=f"{DATA}/gsm8k/test.jsonl",  # "" leaves the calculator figures out
        chat_eval_tokens=160,  # a reply that has not ended its turn by then counts as not ending it
    )
    return config
