"""GRPO end to end on a tiny model: it samples, rewards, steps, logs, checkpoints and resumes (its loss: test_losses)."""

import dataclasses
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = os.path.join(ROOT, "tests", "fixtures", "chat", "words_alpha_slice.txt")


@pytest.mark.slow
def test_the_stage_samples_rewards_steps_logs_checkpoints_and_resumes(tmp_path, monkeypatch, capsys):
    import json

    from llm.config import load_config
    from llm.stages import grpo
    from llm.tasks import spelling
    from llm.bpe import train_bpe

    words = spelling.read_words(WORDS)
    texts = [m["content"] for w in words[:150] for m in spelling.spelling_messages(w, w[0])]
    tok_path = str(tmp_path / "tok.tiktoken")
    train_bpe(texts, 384, name="spell", progress=False).save(tok_path)
    real = grpo.load_task

    def task_with_signal(dc):
        # A random model never counts right; reward an even-length reply instead (about half the samples, so
        # groups differ and steps move: an "e" anywhere was in every sample of some steps).
        return dataclasses.replace(real(dc), grade=lambda p, text: len(text) % 2 == 0)

    monkeypatch.setattr(grpo, "load_task", task_with_signal)
    overrides = ["--config.init_from=", f"--config.data.tokenizer={tok_path}", "--config.model.vocab_size=384",
                 "--config.model.n_layer=2", "--config.model.n_embd=32", "--config.model.mlp_dim=64",
                 "--config.model.max_seq_len=96", f"--config.data.path={WORDS}", "--config.data.prompts_per_step=4",
                 "--config.data.samples_per_prompt=4", "--config.data.seq_len=80", "--config.rl.max_new_tokens=16",
                 "--config.rl.mu=2", "--config.rl.eval_problems=8", "--config.rl.eval_samples=2",
                 "--config.rl.require_stop=False",  # a random model never ends its turn
                 "--config.optimizer.learning_rate=1e-2", "--config.train.eval_every=4",
                 "--config.train.checkpoint_every=2", "--config.train.grad_accum=2"]
    workdir = str(tmp_path / "run")
    summary = grpo.run(load_config(os.path.join(ROOT, "configs", "grpo_tiny.py"),
                                   overrides + ["--config.train.steps=4"]), workdir)
    for key in ("heldout/pass@1", "heldout/pass@2", "heldout/greedy_pass@1", "heldout/pass@1_ci95"):
        assert key in summary.evals and key in summary.first_evals
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    steps = {r["step"]: r for r in rows if "loss" in r}
    assert sorted(steps) == [1, 2, 3, 4]
    for step in (1, 3):  # a fresh rollout every mu = 2 steps, with its figures
        for key in ("task_reward", "pass1_batch", "solved_all", "solved_none", "completion_len", "rollout_s",
                    "rollout_tok_s", "clip_fraction", "kl", "entropy"):
            assert key in steps[step], (step, key)
    assert "rollout_s" not in steps[2] and "clip_fraction" in steps[2]
    assert steps[1]["kl"] == pytest.approx(0.0, abs=1e-6)  # the policy is still the reference
    # At a rollout's first step old == current log-probs, so nothing clips: step 3's rollout saw step 2's params.
    assert steps[1]["clip_fraction"] == 0.0 and steps[3]["clip_fraction"] == 0.0 and steps[1]["normalizer"] > 0
    assert steps[2]["kl"] > 0 and steps[3]["kl"] > 0  # it moved
    assert os.path.exists(os.path.join(workdir, "grpo.png")) and os.path.isdir(os.path.join(workdir, "release"))
    capsys.readouterr()
    summary = grpo.run(load_config(os.path.join(ROOT, "configs", "grpo_tiny.py"),
                                   overrides + ["--config.train.steps=6"]), workdir)
    assert "resumed from step 4" in capsys.readouterr().out and summary.step == 6
