"""Supervised fine-tuning: the language-model loss on conversations, on the assistant's tokens only.

    python -m launch.sft --config configs/sft_tiny.py --workdir runs/sft

What is the stage's own: the conversation mixture (`config.data.sources`, each
`{kind, path, epochs or weight, ...}`: conversation files, `llm/data/conversations.py`,
or what a task contributes, `llm/tasks/`), rendered in the model's chat format and packed without splitting a conversation
(`llm/data/chat_pipeline.py`); validation loss per source on held-out
conversations (assistant tokens only); greedy chat figures on held-out prompts
(replies that end their turn, held-out identity paraphrases that name the
assistant, well-formed calculator calls on held-out GSM8K questions); greedy chat
samples. The loss is `lm_loss` with the rendered mask; steps, logs, checkpoints,
resume and the release (which `launch.chat` opens) are `llm.train.loop`'s.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import re

import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from llm import model, sharding, tasks
from llm.chat_format import tool_tokens
from llm.config import base_config
from llm.data import chat_pipeline as cp
from llm.data import conversations as conv
from llm.generate import Engine, SamplingParams
from llm.tasks import Message, Problem
from llm.tokenizer import Tokenizer
from llm.tools import Calculator
from llm.train import loop
from llm.train.losses import lm_loss
from llm.train.start import host_batches, load_start, micro_batch_size

NAME = "sft"


def base_sft_config(model: str = "tiny", sharding: str = "fsdp", data_dir: str = "../shared/data"
                    ) -> ml_collections.ConfigDict:
    """`base_config` with the stage's data (a conversation mixture) and chat-evaluation fields; configs start here."""
    config = base_config(model, sharding)
    config.data = ml_collections.ConfigDict(dict(
        tokenizer="",  # only for a fresh model (no init_from): a named encoding or a .tiktoken file
        seq_len=256,
        batch_size=16,
        val_fraction=0.1,  # of each source's conversations, by a hash of their keys
        pack_window=256,  # conversations packed together (best fit) at a time
        num_shards=0,
        # Each source: kind (a reader: openai, sharegpt, oasst, hub; or a task: gsm8k, identity, spelling,
        # arithmetic), path, and how much of it a mixture epoch holds: `epochs` (times its conversations: 0.5 is a
        # random half, redrawn every mixture epoch) or `weight` (a share of `mixture_size` conversations); the
        # rest are the reader's options, or the task's (`load_mixture`; identity: who the assistant is, and
        # paraphrases held out).
        sources=dict(
            oasst=dict(kind="oasst", path=f"{data_dir}/chat/oasst1_en_validation.jsonl", epochs=2.0),
            gsm8k=dict(kind="gsm8k", path=f"{data_dir}/gsm8k/train.jsonl", epochs=0.1),
            identity=dict(kind="identity", epochs=3.0, name="Tiny", creator="the llm project",
                          can="answer questions, chat, and do arithmetic with a calculator",
                          cannot="browse the internet, remember past conversations, or see images", held_out=20),
            spelling=dict(kind="spelling", path=f"{data_dir}/words/words_alpha.zip", epochs=1.0, n=400),
        ),
        mixture_size=0,  # conversations per mixture epoch that the `weight` sources share
    ))
    config.train.update(
        sample_prompts=("What is your name?", "What is 12 times 7?",
                        "How many times does the letter 'r' appear in the word \"strawberry\"?"),
        chat_eval=True,  # greedy replies to held-out prompts at every evaluation
        chat_eval_questions=20,  # identity paraphrases and GSM8K test questions asked
        chat_eval_gsm8k=f"{data_dir}/gsm8k/test.jsonl",  # "" leaves the calculator figures out
        chat_eval_tokens=160,  # a reply that has not ended its turn by then counts as not ending it
    )
    return config


def load_mixture(dc: ml_collections.ConfigDict, val_fraction: float
                 ) -> tuple[dict[str, list], dict[str, list], dict[str, float], dict[str, tasks.Task], list[str]]:
    """(train and validation conversations per source, epochs per source, the task of each task source, log lines).

    A source's kind is a reader of conversation files (`conversations.READERS`)
    or a task (`llm.tasks.NAMES`): its `path` and the options the task's `load`
    takes go to `load`, the others to its `conversations`. A source's `weight` w
    becomes epochs w * mixture_size / (its training conversations).
    """
    train, val, epochs, task_of, lines = {}, {}, {}, {}, []
    for name, spec in dc.sources.items():
        if ("epochs" in spec) == ("weight" in spec):
            raise ValueError(f"data.sources.{name}: give either epochs or weight, got {sorted(spec.keys())}")
        options = {k: v for k, v in spec.items() if k not in ("kind", "path", "epochs", "weight")}
        if spec.kind in conv.READERS:
            found = conv.open_conversations(spec.kind, spec.get("path", ""), **options)
        elif spec.kind in tasks.NAMES:
            takes = tasks.options_of(spec.kind)
            task = tasks.load(spec.kind, **{k: options.pop(k) for k in list(options) if k in takes},
                              **({"path": spec.path} if "path" in spec else {}))
            if task.conversations is None:
                raise ValueError(f"data.sources.{name}: task {spec.kind!r} contributes no conversations")
            signature = inspect.signature(task.conversations)
            try:
                signature.bind(**options)
            except TypeError as e:
                raise ValueError(f"data.sources.{name}: {e}; task {spec.kind!r} loads with {', '.join(takes)} and "
                                 f"its conversations take {', '.join(signature.parameters) or 'nothing'}") from None
            found, task_of[name] = conv.collect(task.conversations(**options)), task
        else:
            raise ValueError(f"data.sources.{name}: unknown kind {spec.kind!r}; a reader "
                             f"({', '.join(conv.READERS)}) or a task ({', '.join(tasks.NAMES)})")
        train[name], val[name] = cp.split_keys(found.items, val_fraction)
        if "weight" in spec:
            if dc.mixture_size <= 0 or spec.weight < 0:
                raise ValueError(f"data.sources.{name}.weight={spec.weight} needs data.mixture_size > 0 "
                                 f"(got {dc.mixture_size}) and a weight >= 0")
            epochs[name] = spec.weight * dc.mixture_size / max(len(train[name]), 1)
        else:
            epochs[name] = float(spec.epochs)
        lines.append(f"{name} ({spec.kind}, {epochs[name]:.3g} epochs): {found.describe()}")
    return train, val, epochs, task_of, lines


def build(config: ml_collections.ConfigDict, workdir: str) -> loop.Stage:
    dc, tc = config.data, config.train
    try:  # without init_from, a fresh model (tests, or a chat model trained from scratch)
        cfg, initial_params, tokenizer = load_start(config, chat=True)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{e}\n(init_from={config.init_from!r}: the base model; configs/sft_tiny.py "
                                f"starts from the main job's release, `python -m launch.train --config "
                                f"configs/tiny.py --workdir runs/tiny`)") from e
    if tokenizer.n_vocab > cfg.vocab_size:  # a released base model without the chat and tool tokens
        print(f"adding {tokenizer.n_vocab - cfg.vocab_size} token rows (chat and tool tokens) to the "
              f"{cfg.vocab_size}-row embedding, each the mean of the existing rows")
        cfg, initial_params = add_vocab_rows(cfg, initial_params, tokenizer.n_vocab)
    micro_batch = micro_batch_size(dc.batch_size, tc.grad_accum, "data.batch_size")
    width = dc.seq_len + 1

    train_mix, val_mix, epochs, mixture_tasks, lines = load_mixture(dc, dc.val_fraction)
    train, val = cp.render(train_mix, tokenizer, width), cp.render(val_mix, tokenizer, width)
    described = (f"{len(cp.epoch_indices(train, epochs, config.seed))} conversations per mixture epoch; train: {train.describe()}; "
                 f"validation: {val.describe()}; sequence {dc.seq_len}, batch {dc.batch_size}")
    if jax.process_index() == 0:
        print("sft data:\n  " + "\n  ".join(lines) + "\n  " + described)

    batches = host_batches(config, lambda i, n: cp.make_chat_pipeline(
        train, epochs, seq_len=dc.seq_len, batch_size=micro_batch, seed=config.seed, pack_window=dc.pack_window,
        process_index=i, process_count=n))

    mesh, rules = sharding.make_mesh(config.mesh), dict(config.sharding)
    eval_fn = jax.jit(lambda params, batch: _eval_sums(cfg, params, batch, mesh, rules),
                      out_shardings=NamedSharding(mesh, PartitionSpec()))
    prompts = chat_prompts(tc, mixture_tasks, tokenizer, cfg.max_seq_len)
    val_batches = validation_batches(val, width, micro_batch)

    def evaluate(params, step: int) -> dict[str, float]:
        figures = validation_losses(eval_fn, params, val_batches, sharding.batch_sharding(mesh, rules))
        if tc.chat_eval:
            host = sharding.gather_to_host(params)
            figures |= chat_figures(cfg, host, tokenizer, prompts, tc.chat_eval_tokens)
        return figures

    return loop.Stage(
        cfg=cfg, tokenizer=tokenizer, axes=model.param_axes(cfg),
        init_params=functools.partial(model.init_params, cfg), loss_fn=functools.partial(lm_loss, cfg),
        batches=batches, initial_params=initial_params,
        tokens_per_step=dc.batch_size * dc.seq_len, flops_per_token=model.flops_per_token(cfg, dc.seq_len),
        evaluate=evaluate,
        sample=lambda params: chat_samples(cfg, params, tokenizer, list(tc.sample_prompts), tc.sample_tokens),
        describe=described,
    )


run = loop.runner(NAME, build, "Runs (or resumes) supervised fine-tuning as configured.")


def add_vocab_rows(cfg, params, n_vocab: int):
    """(config, params) with every `vocab` axis grown to `n_vocab`; a new row is the mean of the existing ones.

    For control tokens a base model never saw (the chat and tool tokens of a
    released model whose embedding stops before them). Mean initialisation
    (Hewitt, "Initializing New Word Embeddings for Pretrained Language Models",
    2021): a new token's logit starts at the average logit, far below the likely
    tokens', so the fine-tuning starts from the base model's distribution; random
    rows could instead give a new token a large logit everywhere.
    """
    axes = model.param_axes(cfg)

    def grow(x, names):
        if "vocab" not in names:
            return x
        axis = names.index("vocab")
        x = np.asarray(x)
        extra = n_vocab - x.shape[axis]
        mean = x.mean(axis=axis, keepdims=True)
        return np.concatenate([x, np.repeat(mean, extra, axis=axis).astype(x.dtype)], axis=axis)

    grown = jax.tree.map(grow, params, axes, is_leaf=lambda n: isinstance(n, tuple))
    return dataclasses.replace(cfg, vocab_size=n_vocab), grown


def _eval_sums(cfg, params, batch, mesh, rules):
    with sharding.use_rules(mesh, rules):
        loss_sum, count, _ = lm_loss(cfg, params, batch)
    return loss_sum, count


def validation_batches(val: cp.Rendered, width: int, micro_batch: int) -> dict[str, list[dict[str, np.ndarray]]]:
    """This process's batches of each source's held-out conversations, packed once for every evaluation.

    Each process takes its slice of the same rows, padded to the same number of
    batches with rows that train nothing, so the collectives line up.
    """
    local = micro_batch // jax.process_count()
    out = {}
    for name in dict.fromkeys(val.sources):
        rows = cp.pack(val, val.of(name), width)
        n_batches = -(-len(rows) // micro_batch)
        batches = cp.padded_batches(rows[jax.process_index()::jax.process_count()], local)
        empty = {k: np.zeros_like(v) for k, v in (batches[0] if batches else cp.batch_spec(width - 1, local)).items()}
        out[name] = batches + [empty] * (n_batches - len(batches))
    return out


def validation_losses(eval_fn, params, batches: dict[str, list[dict[str, np.ndarray]]], placement
                      ) -> dict[str, float]:
    """Loss per assistant token on each source's held-out conversations (`val_loss/<source>`) and over all (`val_loss`)."""
    figures, total_sum, total_count = {}, 0.0, 0.0
    for name, source_batches in batches.items():
        loss_sum = count = 0.0
        for batch in source_batches:
            batch = jax.tree.map(lambda x: jax.make_array_from_process_local_data(placement, x), batch)
            s, c = jax.device_get(eval_fn(params, batch))
            loss_sum, count = loss_sum + float(s), count + float(c)
        if count:
            figures[f"val_loss/{name}"] = loss_sum / count
        total_sum, total_count = total_sum + loss_sum, total_count + count
    if total_count:
        figures["val_loss"] = total_sum / total_count
    return figures


# ----------------------------------------------------------------------------- greedy chat


def chat_prompts(tc: ml_collections.ConfigDict, mixture_tasks: dict[str, tasks.Task], tokenizer: Tokenizer,
                 context: int) -> dict[str, tuple[tasks.Task, list[Problem]]]:
    """The chat figures' tasks and held-out problems: the mixture's identity paraphrases and the first GSM8K test
    problems (`train.chat_eval_gsm8k`) that fit, `train.chat_eval_questions` of each.

    A problem fits when its prompt leaves a quarter of the model's context for the reply.
    """
    prompts = {}
    identity = [t for t in mixture_tasks.values() if t.name == "identity"]
    if identity:
        prompts["identity"] = (identity[-1], identity[-1].problems("test", 0, 0)[:tc.chat_eval_questions])
    if tc.chat_eval_gsm8k:
        gsm8k = tasks.load("gsm8k", eval_path=tc.chat_eval_gsm8k)
        fitting = []
        for problem in gsm8k.problems("test", 0, 0):
            if len(fitting) == tc.chat_eval_questions:
                break
            if len(tokenizer.render_for_completion(problem.messages)) <= 3 * context // 4:
                fitting.append(problem)
        prompts["gsm8k"] = (gsm8k, fitting)
    return prompts


def _greedy(cfg, host_params, tokenizer: Tokenizer, conversations: list[list[Message]], max_new_tokens: int):
    tools = {"python": Calculator()} if tokenizer.has_tool("python") else {}
    engine = Engine(cfg, jax.device_put(host_params, jax.local_devices()[0]), tokenizer, tools=tools)
    # A reply that reaches the model's context stops there ("context") and counts as not ending its turn.
    prompts = [tokenizer.render_for_completion(messages) for messages in conversations]
    sampling = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0,
                              stop_token_ids=tokenizer.chat_stop_ids)
    return [s for [s] in engine.generate(prompts, sampling)] if prompts else []


def chat_figures(cfg, host_params, tokenizer: Tokenizer, prompts: dict[str, tuple[tasks.Task, list[Problem]]],
                 max_new_tokens: int) -> dict[str, float]:
    """Greedy replies to held-out prompts, measured.

    - `chat/end_of_turn`: share of replies that end with the end-of-turn token within `max_new_tokens`;
    - `chat/identity_named`: share of held-out identity paraphrases whose reply names the assistant
      (the identity task's `grade`);
    - `chat/calc_wellformed`: share of GSM8K replies with at least one calculator call, every call
      closed and evaluable by the `Calculator`; `chat/gsm8k_correct`: right by the GSM8K task's `grade`.
    """
    identity_task, identity = prompts.get("identity", (None, []))
    gsm8k_task, gsm8k = prompts.get("gsm8k", (None, []))
    samples = _greedy(cfg, host_params, tokenizer, [list(p.messages) for p in identity + gsm8k], max_new_tokens)
    if not samples:
        return {}
    ended = [s.tokens[-1:] == [tokenizer.end_of_turn] for s in samples]
    figures = {"chat/end_of_turn": float(np.mean(ended))}
    if identity:
        named = [identity_task.grade(p, s.text) for p, s in zip(identity, samples)]
        figures["chat/identity_named"] = float(np.mean(named))
    if gsm8k:
        replies = samples[len(identity):]
        figures["chat/calc_wellformed"] = float(np.mean([_calls_wellformed(s.tokens, tokenizer) for s in replies]))
        figures["chat/gsm8k_correct"] = float(np.mean(
            [gsm8k_task.grade(problem, s.text) for s, problem in zip(replies, gsm8k)]))
    return figures


def _calls_wellformed(tokens: list[int], tokenizer: Tokenizer) -> bool:
    """At least one calculator call, each closed by its end token and evaluable."""
    if not tokenizer.has_tool("python"):
        return False
    start, end, _, _ = (tokenizer.token_id(t) for t in tool_tokens("python"))
    calls, i = 0, 0
    while start in tokens[i:]:
        i = tokens.index(start, i) + 1
        if end not in tokens[i:]:
            return False
        j = tokens.index(end, i)
        try:
            Calculator().evaluate(tokenizer.decode(tokens[i:j]))
        except (ValueError, ArithmeticError):
            return False
        calls, i = calls + 1, j + 1
    return calls > 0


def chat_samples(cfg, host_params, tokenizer: Tokenizer, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy replies to fixed user messages, for the log."""
    samples = _greedy(cfg, host_params, tokenizer, [[{"role": "user", "content": p}] for p in prompts], max_new_tokens)
    return [f"{p} -> " + re.sub(r"\s+", " ", s.text) for p, s in zip(prompts, samples)]
