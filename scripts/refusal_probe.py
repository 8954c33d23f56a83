"""Does the model know what it knows? A linear probe of its hidden state at the end of each question.

    python scripts/refusal_probe.py runs/refusals      (after `bash scripts/refusals_smollm2.sh runs/refusals`)

The refusal fine-tuning (`scripts/refusals_smollm2.sh`) has to learn, from a few
hundred interrogated questions, when to answer: a readout of the model's own state
before it says a word. This script measures the best such readout can do, so a
fine-tuned result can be judged against it: for every layer, the hidden state at the
last prompt token of the interrogated questions (answer = known or unsure, refuse =
unknown; the side files `launch.interrogate` wrote) trains an L2 logistic regression,
scored on the held-out questions against whether the model was right there (greedy,
`before.json`): the AUROC, then the accuracy and hallucination rate (as
`refusals.evaluate` counts them) if the model answered exactly where the probe of the
best layer says so, with the answers weighted 1-20x in training (the answer/refuse
share a fine-tuning mixture sets). The layer is picked on the held-out AUROC, so the
table is an upper bound on what a readout of that state can do, not an estimate.
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from scipy.optimize import minimize

from llm import model
from llm.release import load_release
from llm.tasks import qa, refusals


def prompt_states(checkpoint: str, problems, batch_size: int = 50) -> np.ndarray:
    """[questions, layers, D] float32: each layer's output at the last prompt token (the last after the final norm)."""
    cfg, params, tokenizer = load_release(checkpoint)
    ids = refusals.prompts(tokenizer, problems)
    width = max(map(len, ids))

    @jax.jit
    def states(tokens_BxT, lengths_B):
        x_BxTxD, context = model.embed(cfg, params, tokens_BxT)
        carry, last = (x_BxTxD, None), []
        for i in range(cfg.n_layer):
            carry, _ = model.block(cfg, context, carry, (jax.tree.map(lambda a: a[i], params["blocks"]), i))
            h_BxTxD = carry[0] if i < cfg.n_layer - 1 else model.final_norm(cfg, params, carry[0])
            last.append(jnp.take_along_axis(h_BxTxD, (lengths_B - 1)[:, None, None], axis=1)[:, 0])
        return jnp.stack(last, axis=1)

    out = []
    for start in range(0, len(ids), batch_size):
        batch = ids[start:start + batch_size]
        tokens = np.zeros((len(batch), width), np.int32)
        for row, seq in enumerate(batch):
            tokens[row, :len(seq)] = seq
        out.append(np.asarray(states(tokens, np.array([len(s) for s in batch], np.int32)), np.float32))
    return np.concatenate(out)


def fit_probe(x_NxD: np.ndarray, y_N: np.ndarray, weight_N: np.ndarray, l2: float) -> np.ndarray:
    """Weights [D + 1] of an L2 logistic regression (the bias unpenalised), by L-BFGS."""
    x = np.hstack([x_NxD, np.ones((len(x_NxD), 1))])

    def loss_grad(w):
        z = x @ w
        p = 1 / (1 + np.exp(-z))
        loss = np.sum(weight_N * (np.logaddexp(0, z) - y_N * z)) + 0.5 * l2 * w[:-1] @ w[:-1]
        grad = x.T @ (weight_N * (p - y_N))
        grad[:-1] += l2 * w[:-1]
        return loss, grad

    return minimize(loss_grad, np.zeros(x.shape[1]), jac=True, method="L-BFGS-B").x


def auroc(score_N: np.ndarray, y_N: np.ndarray) -> float:
    """The chance that a positive outranks a negative (Mann-Whitney U), ties counting half."""
    pos, neg = score_N[y_N], score_N[~y_N]
    return float(np.mean((pos[:, None] > neg[None]) + 0.5 * (pos[:, None] == neg[None])))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", help="the refusal run's directory (conversations*.jsonl, before.json)")
    parser.add_argument("--checkpoint", default="../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf")
    parser.add_argument("--questions", default="../shared/data/evals/triviaqa_validation.jsonl")
    parser.add_argument("--l2", type=float, default=1000.0, help="L2 strength on the standardised features")
    args = parser.parse_args()

    answer = {}
    for verdict in ("known", "unsure", "unknown"):
        for line in open(refusals.side_path(os.path.join(args.runs, "conversations.jsonl"), verdict)):
            answer[json.loads(line)["key"]] = verdict != "unknown"
    right = {r["key"]: r["right"] for r in json.load(open(os.path.join(args.runs, "before.json")))["records"]}
    problems = qa.problems(args.questions, limit=len(right) + len(answer))  # held out first, then interrogated
    train, held = [p for p in problems if p.key in answer], [p for p in problems if p.key in right]
    states = prompt_states(args.checkpoint, train + held)
    y_train = np.array([answer[p.key] for p in train])
    y_held = np.array([right[p.key] for p in held])
    print(f"{len(train)} interrogated questions ({y_train.sum()} answer), {len(held)} held out "
          f"({y_held.sum()} right before); L2 {args.l2}")

    def standardised(layer):
        x = states[:, layer]
        mean, std = x[:len(train)].mean(0), x[:len(train)].std(0) + 1e-6
        return (x[:len(train)] - mean) / std, (x[len(train):] - mean) / std

    aurocs = []
    for layer in range(states.shape[1]):
        x_train, x_held = standardised(layer)
        w = fit_probe(x_train, y_train, np.where(y_train, y_train.size / y_train.sum(), 1.0), args.l2)
        aurocs.append(auroc(x_held @ w[:-1], y_held))
    best = int(np.argmax(aurocs))
    print("held-out AUROC by layer: " + ", ".join(f"{i}: {a:.3f}" for i, a in enumerate(aurocs)))
    print(f"| answers weighted | answer share in training | accuracy | hallucination | answered |  (layer {best})")
    print("|---:|---:|---:|---:|---:|")
    x_train, x_held = standardised(best)
    for weight in (1, 3, 5, 10, 20):
        weights = np.where(y_train, float(weight), 1.0)
        w = fit_probe(x_train, y_train, weights, args.l2)
        answered = x_held @ w[:-1] + w[-1] > 0
        share = np.sum(weights * y_train) / np.sum(weights)
        print(f"| {weight}x | {share:.2f} | {np.mean(answered & y_held):.3f} | {np.mean(answered & ~y_held):.3f} | "
              f"{np.mean(answered):.2f} |")
    print(f"before fine-tuning: accuracy {y_held.mean():.3f}, hallucination {1 - y_held.mean():.3f}")


if __name__ == "__main__":
    main()
