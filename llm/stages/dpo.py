"""Direct Preference Optimization: the policy learns from preference pairs directly, no reward model, no sampling.

    python -m launch.dpo --config configs/dpo_tiny.py --workdir runs/dpo

What is the stage's own: the pair sources (the reward stage's `data.sources`,
`llm/data/preferences.py`), split into train and held-out pairs by prompt; the
reference log-probabilities of every pair's two replies, computed once at the
start from the starting model (`init_from`, the SFT policy) and kept beside the
pairs, so no reference model is held during training (as TRL's
`precompute_ref_log_probs`); the loss `dpo_loss_fn` (Rafailov et al. 2023, with
`dpo.beta`, `dpo.label_smoothing` and optional length normalisation). Held-out
figures: the implicit reward margin beta * (log-ratio chosen - log-ratio
rejected), its accuracy, each side's implicit reward, and the policy's mean
log-probability of the chosen and the rejected replies (the chosen one often
falls while the margin rises: DPO pushes the two apart, not the chosen one up).
Steps, logs, checkpoints, resume and the release (a policy `launch.chat` opens)
are `llm.train.loop`'s.
"""

from __future__ import annotations

import functools

import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from llm import model, sharding
from llm.data import pair_rows
from llm.train import loop
from llm.train.pairs import base_pair_config, check_pair_stage, held_out_evaluator, pair_batches
from llm.train.start import load_start
from llm.train.losses import dpo_loss_fn, sequence_logprobs

NAME = "dpo"


def base_dpo_config(model_name: str = "tiny", sharding_name: str = "fsdp", data_dir: str = "../shared/data"
                    ) -> ml_collections.ConfigDict:
    """The pair sources (data.*) and DPO's knobs (dpo.*); configs start here."""
    config = base_pair_config(model_name, sharding_name, data_dir)
    config.dpo = ml_collections.ConfigDict(dict(
        beta=0.1,  # the implicit reward's scale (the KL penalty's inverse strength)
        label_smoothing=0.0,  # conservative DPO: the probability that a label is flipped
        length_normalize=False,  # mean instead of summed log-probabilities per reply
    ))
    config.optimizer.update(learning_rate=1e-6, warmup_steps=10, weight_decay=0.0)
    return config


def build(config: ml_collections.ConfigDict, workdir: str) -> loop.Stage:
    dc, pc = config.data, config.dpo
    cfg, initial_params, tokenizer = load_start(config)
    if initial_params is None:  # a fresh policy (tests): its own init is the reference
        initial_params = jax.tree.map(np.asarray, model.init_params(cfg, jax.random.key(config.seed)))
    micro_batch = check_pair_stage(config, cfg, tokenizer)
    # A row holds W = seq_len + 1 tokens: the model reads the first seq_len and predicts the last seq_len.
    train_parts, val_parts, lines = pair_rows.load_sources(dc.sources, tokenizer, dc.seq_len + 1, dc.val_fraction)
    train = pair_rows.concat_rows(train_parts)
    if jax.process_index() == 0:
        print("dpo data:\n  " + "\n  ".join(lines))

    mesh, rules = sharding.make_mesh(config.mesh), dict(config.sharding)
    logp_fn = jax.jit(functools.partial(_pair_logprobs, cfg, mesh, rules, pc.length_normalize),
                      out_shardings=NamedSharding(mesh, PartitionSpec()))
    reference = sharding.place_host(initial_params, sharding.param_shardings(
        model.param_axes(cfg), initial_params, mesh, rules))
    for rows in [train, *val_parts.values()]:
        add_reference_logprobs(logp_fn, reference, rows, micro_batch, mesh, rules)
    del reference

    batches = pair_batches(config, train, micro_batch)
    loss_fn = functools.partial(dpo_loss_fn, cfg, beta=pc.beta, label_smoothing=pc.label_smoothing,
                                length_normalize=pc.length_normalize)

    val_batches = {name: pair_rows.padded_pair_batches(rows, micro_batch, jax.process_index(), jax.process_count())
                   for name, rows in val_parts.items() if len(rows)}
    evaluate = held_out_evaluator(loss_fn, val_batches, mesh, rules, dpo_figures)

    return loop.Stage(
        cfg=cfg, tokenizer=tokenizer, axes=model.param_axes(cfg),
        init_params=functools.partial(model.init_params, cfg), loss_fn=loss_fn, batches=batches,
        initial_params=initial_params, tokens_per_step=2 * dc.batch_size * dc.seq_len,
        flops_per_token=model.flops_per_token(cfg, dc.seq_len), evaluate=evaluate,
        describe=f"{len(train)} training pairs, beta {pc.beta}, label smoothing {pc.label_smoothing}"
                 + (", length-normalised" if pc.length_normalize else "") + "; " + "; ".join(lines),
    )


run = loop.runner(NAME, build, "Runs (or resumes) DPO as configured.")


def _pair_logprobs(cfg, mesh, rules, length_normalize, params, batch):
    with sharding.use_rules(mesh, rules):
        return tuple(sequence_logprobs(cfg, params, batch[f"{side}_tokens"], batch[f"{side}_mask"],
                                       length_normalize=length_normalize) for side in ("chosen", "rejected"))


def add_reference_logprobs(logp_fn, params, rows: pair_rows.PairRows, micro_batch: int, mesh, rules) -> None:
    """Writes `ref_chosen_logp` and `ref_rejected_logp` [N] into `rows.arrays`: the reference's log-probabilities.

    Every process takes part in every batch (its slice of the pairs) and gets
    every pair's values back, so each can later draw any pair.
    """
    count, local = jax.process_count(), micro_batch // jax.process_count()
    chosen, rejected = np.zeros(len(rows), np.float32), np.zeros(len(rows), np.float32)
    slices = [np.arange(len(rows))[p::count] for p in range(count)]
    for b, batch in enumerate(pair_rows.padded_pair_batches(rows, micro_batch, jax.process_index(), count)):
        c_B, r_B = jax.device_get(logp_fn(params, sharding.shard_batch(batch, mesh, rules)))
        for p, mine in enumerate(slices):  # global row j of the batch is process j // local's row j % local
            index = mine[b * local:(b + 1) * local]
            chosen[index], rejected[index] = c_B[p * local:p * local + len(index)], r_B[p * local:p * local + len(index)]
    rows.arrays["ref_chosen_logp"], rows.arrays["ref_rejected_logp"] = chosen, rejected


def dpo_figures(total: dict[str, float]) -> dict[str, float]:
    """Held-out means per pair: `loss`, `accuracy`, `margin` (implicit reward margin), `chosen_reward`,
    `rejected_reward`, and the policy's `chosen_logp` and `rejected_logp`, from the loss's sums."""
    pairs = total["pairs"]
    return {("accuracy" if k == "correct" else k): v / pairs for k, v in total.items() if k != "pairs"}
