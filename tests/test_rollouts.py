"""The on-policy core: advantage estimators worked out by hand, training rows from samples, RLOO end to end."""

import os

import numpy as np
import pytest

from llm.train.rollouts import ADVANTAGES, advantage_estimator, group_advantages, leave_one_out_advantages, \
    rollout_rows

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- advantages by hand


def test_group_advantages_by_hand_equal_groups_give_zero_never_nan():
    rewards = np.array([[1, 0, 0, 1], [1, 1, 1, 1], [0, 0, 0, 0], [1, 0, 0, 0]], float)
    # group: row 0 mean 0.5, std 0.5 -> +-1; row 3 mean 0.25, std sqrt(0.25 * 0.75) = 0.4330127
    #        -> 0.75 / 0.4330127 = 1.7320508, -0.25 / 0.4330127 = -0.5773503; rows 1 and 2 all equal -> 0
    adv, degenerate = group_advantages(rewards, "group")
    np.testing.assert_allclose(adv, [[1, -1, -1, 1], [0] * 4, [0] * 4, [1.7320508, -0.5773503, -0.5773503,
                                                                          -0.5773503]], rtol=1e-6)
    assert degenerate.tolist() == [False, True, True, False]
    # none: the centred rewards; row 3 -> 0.75, -0.25, -0.25, -0.25
    adv, _ = group_advantages(rewards, "none")
    np.testing.assert_allclose(adv[[0, 3]], [[0.5, -0.5, -0.5, 0.5], [0.75, -0.25, -0.25, -0.25]])
    # batch: 7 ones of 16 rewards, std sqrt(0.4375 * 0.5625) = 0.4960783 -> row 0: +-0.5 / 0.4960783 = +-1.0079053,
    # row 3: 0.75 / 0.4960783 = 1.5118579, -0.25 / 0.4960783 = -0.5039526
    adv, _ = group_advantages(rewards, "batch")
    np.testing.assert_allclose(adv[0], [1.0079053, -1.0079053, -1.0079053, 1.0079053], rtol=1e-6)
    np.testing.assert_allclose(adv[3], [1.5118579, -0.5039526, -0.5039526, -0.5039526], rtol=1e-6)
    # Equal non-binary rewards whose float mean is not exactly themselves: still exactly 0.
    for scale in ("group", "batch", "none"):
        adv, degenerate = group_advantages(np.full((2, 3), 0.1), scale)
        assert np.all(adv == 0.0) and degenerate.all()
    with pytest.raises(ValueError, match="scale"):
        group_advantages(rewards, "rank")




def test_rollout_rows_train_on_sampled_completion_tokens_only_not_prompt_padding_or_forced_tool_output():
    from llm.generate import Sample

    # Prompt 5 6 7; completion 8 (sampled) 9 10 (forced tool output) 11 (sampled).
    sample = Sample([8, 9, 10, 11], [-1.0, 0.0, 0.0, -2.0], [False, True, True, False], "stop")
    rows = rollout_rows([[5, 6, 7]], [[sample]], width=8)
    assert rows["inputs"].tolist() == [[5, 6, 7, 8, 9, 10, 0, 0]]
    assert rows["targets"].tolist() == [[6, 7, 8, 9, 10, 11, 0, 0]]
    # Target j predicts token j + 1: 8 and 11 are trained; the prompt's 6, 7, the tool's 9, 10 and padding are not.
    assert rows["loss_mask"].tolist() == [[0, 0, 1, 0, 0, 1, 0, 0]]
    with pytest.raises(ValueError, match="seq_len"):
        rollout_rows([[5, 6, 7]], [[sample]], width=5)


def test_rloo_advantages_by_hand_on_two_groups_of_three():
    rewards = np.array([[1.0, 0.0, 0.0], [0.5, 1.0, 2.0]])
    # Each reward minus the mean of the two others in its group:
    #   row 0: 1 - (0 + 0) / 2 = 1;      0 - (1 + 0) / 2 = -0.5;   0 - (1 + 0) / 2 = -0.5
    #   row 1: 0.5 - (1 + 2) / 2 = -1;   1 - (0.5 + 2) / 2 = -0.25; 2 - (0.5 + 1) / 2 = 1.25
    adv, degenerate = leave_one_out_advantages(rewards)
    np.testing.assert_allclose(adv, [[1.0, -0.5, -0.5], [-1.0, -0.25, 1.25]], rtol=1e-7)
    assert degenerate.tolist() == [False, False]
    # = G / (G - 1) times GRPO's centred rewards ("none"): the two estimators differ by that factor only.
    np.testing.assert_allclose(adv, 1.5 * group_advantages(rewards, "none")[0], rtol=1e-6)
    adv, degenerate = leave_one_out_advantages(np.full((1, 3), 0.1))
    assert np.all(adv == 0.0) and degenerate.all()
    with pytest.raises(ValueError, match="at least 2 samples"):
        leave_one_out_advantages(np.ones((2, 1)))


def test_the_estimator_is_chosen_by_name_and_an_unknown_name_is_an_error():
    import ml_collections

    rewards = np.array([[1.0, 0.0, 0.0], [0.5, 1.0, 2.0]])
    rc = ml_collections.ConfigDict({"advantage": "rloo", "scale": "group"})
    np.testing.assert_array_equal(advantage_estimator(rc)(rewards)[0], leave_one_out_advantages(rewards)[0])
    rc.advantage = "grpo"
    np.testing.assert_array_equal(advantage_estimator(rc)(rewards)[0], group_advantages(rewards, "group")[0])
    rc.advantage = "ppo"
    with pytest.raises(ValueError, match="unknown rl.advantage 'ppo'; choose from"):
        advantage_estimator(rc)
    assert sorted(ADVANTAGES) == ["grpo", "rloo"]




@pytest.mark.slow
def test_grpo_tiny_runs_end_to_end_with_rloo_advantages(tmp_path):
    import json

    from llm import tasks
    from llm.config import load_config
    from llm.stages import grpo
    from llm.bpe import train_bpe

    words = os.path.join(ROOT, "tests", "fixtures", "chat", "words_alpha_slice.txt")
    problems = tasks.load("spelling", path=words).problems("train", 150, 0)
    tok_path = str(tmp_path / "tok.tiktoken")
    train_bpe([p.messages[0]["content"] for p in problems], 384, name="spell", progress=False).save(tok_path)
    overrides = ["--config.init_from=", f"--config.data.tokenizer={tok_path}", "--config.model.vocab_size=384",
                 "--config.model.n_layer=1", "--config.model.n_embd=32", "--config.model.mlp_dim=64",
                 "--config.model.max_seq_len=96", f"--config.data.path={words}", "--config.data.prompts_per_step=2",
                 "--config.data.samples_per_prompt=4", "--config.data.seq_len=80", "--config.rl.max_new_tokens=12",
                 "--config.rl.eval_problems=4", "--config.rl.eval_samples=1", "--config.rl.eval_greedy=False",
                 "--config.rl.require_stop=False", "--config.rl.advantage=rloo", "--config.rl.drop_degenerate=False",
                 "--config.train.steps=2", "--config.train.eval_every=2", "--config.train.checkpoint_every=2"]
    workdir = tmp_path / "run"
    summary = grpo.run(load_config(os.path.join(ROOT, "configs", "grpo_tiny.py"), overrides), str(workdir))
    assert summary.step == 2 and np.isfinite(summary.train_loss) and "heldout/pass@1" in summary.evals
    rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
    assert "advantages rloo" in (workdir / "report.md").read_text()
