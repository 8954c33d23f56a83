"""RLHF: the gold preference and distinct-n by hand, the hacking monitor on fixed sequences, the stage end to end."""

import json
import os

import jax
import numpy as np
import pytest

from llm import reward_model
from llm.config import ModelConfig, load_config
from llm.stages import rlhf
from llm.tasks import Problem
from llm.train.monitor import HackingMonitor, distinct_n

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = os.path.join(ROOT, "tests", "fixtures", "chat", "words_alpha_slice.txt")


def test_gold_score_puts_a_right_answer_first_then_shortness_and_a_wrong_one_at_zero():
    problem = Problem(messages=({"role": "user", "content": "?"},), answer="3")

    def right(p, text):
        return float(text.endswith("#### 3"))

    # right, 20 of 100 tokens: 1 * (1 + 0.5 * 0.8) = 1.4; wrong, however short: 0
    assert rlhf.gold_score(right, 0.5, 100, problem, "... #### 3", 20) == pytest.approx(1.4)
    assert rlhf.gold_score(right, 0.5, 100, problem, "#### 2", 1) == 0.0
    assert rlhf.gold_score(right, 0.5, 100, problem, "#### 3", 250) == pytest.approx(1.0)  # cut at the limit


def test_distinct_n_by_hand():
    # unigrams: 1 2 1 2 | 3 -> 3 distinct of 5; bigrams: (1,2) (2,1) (1,2) -> 2 of 3 (the one-token sample has none)
    assert distinct_n([[1, 2, 1, 2], [3]], 1) == pytest.approx(3 / 5)
    assert distinct_n([[1, 2, 1, 2], [3]], 2) == pytest.approx(2 / 3)
    assert distinct_n([[7]], 2) == 0.0


def test_the_monitor_keeps_the_best_judge_and_alarms_after_patience_evaluations_of_proxy_up_judge_down():
    monitor = HackingMonitor(patience=2)
    #        step  proxy judge  -> best?  why
    seq = [(0, 0.0, 0.50),  # best (first)
           (10, 0.5, 0.70),  # best
           (20, 0.9, 0.60),  # proxy above 0.5, judge below 0.7: streak 1
           (30, 0.4, 0.65),  # proxy below its value at the best: streak resets
           (40, 1.2, 0.55),  # streak 1
           (50, 1.5, 0.40),  # streak 2: alarm
           (60, 1.8, 0.30)]  # still hacked; the alarm stays the first one
    bests, messages = [], []
    for step, proxy, judge in seq:
        best, message = monitor.update(step, proxy, judge)
        bests.append(best)
        messages.append(message)
    assert bests == [True, True, False, False, False, False, False]
    assert [bool(m) for m in messages] == [False] * 5 + [True, False]
    assert monitor.best == {"step": 10, "proxy": 0.5, "judge": 0.7, "judge_se": 0.0} and monitor.alarm["step"] == 50
    assert "from 0.7000 (step 10) to 0.4000" in messages[5]
    assert monitor.alarms == [monitor.alarm]
    # A new best withdraws the alarm, and says so.
    best, message = monitor.update(70, 2.0, 0.75)
    assert best and monitor.alarm is None and "alarm of step 50 is withdrawn" in message and len(monitor.alarms) == 1
    restored = HackingMonitor(patience=2)
    restored.restore(json.loads(json.dumps(monitor.state())))
    assert restored.state() == monitor.state()


def test_a_judge_drop_within_its_noise_does_not_count():
    # best 0.70 +- 0.05 (standard error); z 1.64: a drop counts only beyond 1.64 * hypot(0.05, 0.05) = 0.116
    monitor = HackingMonitor(patience=1)
    monitor.update(0, 0.0, 0.70, 0.05)
    assert monitor.update(10, 1.0, 0.60, 0.05) == (False, "") and monitor.alarm is None  # 0.10 < 0.116
    best, message = monitor.update(20, 1.0, 0.58, 0.05)  # 0.12 > 0.116
    assert not best and message.startswith("reward hacking") and monitor.alarm["step"] == 20


def _tiny_rlhf(tmp_path):
    """Overrides of the over-optimisation config for a fresh 2-layer policy on letter counting, with a reward model
    whose head reads the last hidden state linearly, saved in tmp_path."""
    from llm.tasks import spelling
    from llm.bpe import train_bpe
    from llm.tokenizer import Tokenizer

    words = spelling.read_words(WORDS)
    texts = [m["content"] for w in words[:150] for m in spelling.spelling_messages(w, w[0])]
    tok_path = str(tmp_path / "tok.tiktoken")
    train_bpe(texts, 384, name="spell", progress=False).save(tok_path)
    cfg = ModelConfig(family="llama", vocab_size=384, n_layer=2, n_embd=32, n_head=4, n_kv_head=2, mlp_dim=64,
                      max_seq_len=96, tie_embeddings=True)
    params = reward_model.init_params(cfg, jax.random.key(1))
    params["head"] = {"kernel": np.linspace(-1, 1, cfg.n_embd).astype(np.float32), "bias": np.float32(0.0)}
    reward_model.save(str(tmp_path / "rm"), cfg, jax.device_get(params), Tokenizer.load(tok_path))
    return ["--config.init_from=", f"--config.data.tokenizer={tok_path}", "--config.model.vocab_size=384",
            "--config.model.n_layer=2", "--config.model.n_embd=32", "--config.model.mlp_dim=64",
            "--config.model.max_seq_len=96", "--config.data.task=spelling", f"--config.data.path={WORDS}",
            "--config.rlhf.gold=rule", "--config.data.prompts_per_step=4",
            "--config.data.samples_per_prompt=4", "--config.data.seq_len=80", "--config.rl.max_new_tokens=16",
            "--config.rl.eval_problems=8", "--config.rl.require_stop=False", "--config.rlhf.gold_problems=4",
            f"--config.rlhf.reward_model={tmp_path / 'rm'}", "--config.optimizer.learning_rate=1e-2"]


@pytest.mark.slow
def test_the_stage_scores_with_the_reward_model_monitors_the_gold_and_stops_at_the_alarm(tmp_path, monkeypatch):
    class AlarmAtThirdEvaluation(HackingMonitor):
        def update(self, step, proxy, judge, judge_se=0.0):
            best, message = super().update(step, proxy, judge, judge_se)
            if len(self.history) == 3 and self.alarm is None:
                self.alarm, message = self.history[-1], "reward hacking: (forced by the test)"
            return best, message

    monkeypatch.setattr(rlhf, "HackingMonitor", AlarmAtThirdEvaluation)
    overrides = _tiny_rlhf(tmp_path) + ["--config.rlhf.stop_on_hacking=True", "--config.train.eval_every=1",
                                        "--config.train.steps=5", "--config.train.checkpoint_every=5"]
    workdir = tmp_path / "run"
    summary = rlhf.run(load_config(os.path.join(ROOT, "configs", "overoptimization_tiny.py"), overrides), str(workdir))
    assert summary.step == 2  # evaluations at steps 0, 1, 2: the alarm at the third stops the run there
    rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    steps = {r["step"]: r for r in rows if "loss" in r}
    assert sorted(steps) == [1, 2]
    for key in ("proxy_reward", "judge_reward", "kl", "entropy", "completion_len"):
        assert key in steps[1], key
    evals = [r for r in rows if "eval/proxy" in r]
    assert [r["step"] for r in evals] == [0, 1, 2]
    assert abs(evals[0]["eval/kl"]) < 1e-4  # the policy is the reference at step 0
    for key in ("eval/judge", "eval/gold", "eval/length", "eval/distinct_2", "monitor/best_judge_step"):
        assert key in evals[-1], key
    assert evals[-1]["monitor/alarm"] == 1.0
    assert "reward" not in steps[1]  # the batch-normalised proxy (0 by construction) is not logged as a reward
    assert (workdir / "best_judge" / "model.safetensors").exists() and (workdir / "rlhf.png").exists()
    report = (workdir / "report.md").read_text()
    assert "Reward hacking detected at step 2" in report and "Gold (on prompts the monitor never sees)" in report
    assert (workdir / "checkpoints" / "2").exists()  # the stopping step is checkpointed


@pytest.mark.slow
def test_a_run_killed_after_a_checkpoint_resumes_the_monitor_and_best_judge_of_that_checkpoint(tmp_path, monkeypatch):
    """Evaluations at steps 0, 2, 4, 6 and checkpoints at 3 and 6; the run dies at step 5, after step 4's evaluation
    found a new best that the resumed run, replaying steps 4-6, does not reach (as when its schedule changed): the
    resumed run must not keep that best, in its record or in best_judge/."""
    import functools

    from llm.checkpoint import Checkpointer
    from llm.train import loop

    judged = {"crashed": {0: 0.5, 2: 0.6, 4: 0.9}, "replayed": {0: 0.5, 2: 0.6, 4: 0.4, 6: 0.3}}
    trajectory = {"now": "replayed"}

    class ScriptedJudge(HackingMonitor):  # the judge's score by step, as the trajectory of the moment has it
        def update(self, step, proxy, judge, judge_se=0.0):
            return super().update(step, proxy, judged[trajectory["now"]][step], 0.0)

    class Crash(Exception):
        pass

    def dies_at_step_5(config, workdir):
        stage = rlhf.build(config, workdir)
        rollout = stage.rollout

        def maybe_die(params, step):
            if step == 5:
                raise Crash
            return rollout(params, step)

        stage.rollout = maybe_die
        return stage

    monkeypatch.setattr(rlhf, "HackingMonitor", ScriptedJudge)
    # The kill is in-process: step 3's write must be whole on disk, as it is when a process dies after it.
    monkeypatch.setattr(loop, "Checkpointer", functools.partial(Checkpointer, async_writes=False))
    config = load_config(os.path.join(ROOT, "configs", "overoptimization_tiny.py"), _tiny_rlhf(tmp_path) + [
        "--config.train.eval_every=2", "--config.train.checkpoint_every=3", "--config.train.steps=6"])
    rlhf.run(config, str(tmp_path / "uninterrupted"))

    trajectory["now"] = "crashed"
    with pytest.raises(Crash):
        loop.run(rlhf.NAME, dies_at_step_5, config, str(tmp_path / "resumed"))
    assert os.readlink(tmp_path / "resumed" / "best_judge") == os.path.join("best_judge.steps", "4")
    trajectory["now"] = "replayed"
    rlhf.run(config, str(tmp_path / "resumed"))

    records = [json.loads((tmp_path / run / "monitor.json").read_text()) for run in ("uninterrupted", "resumed")]
    assert records[0] == records[1] and [p["step"] for p in records[1]["history"]] == [0, 2, 4, 6]
    assert records[1]["best"]["step"] == 2
    for run in ("uninterrupted", "resumed"):
        assert os.readlink(tmp_path / run / "best_judge") == os.path.join("best_judge.steps", "2")
    kept = [(tmp_path / run / "best_judge" / "model.safetensors").read_bytes() for run in ("uninterrupted", "resumed")]
    assert kept[0] == kept[1]
    assert not (tmp_path / "resumed" / "best_judge.steps" / "4").exists()  # the lost trajectory's best is gone


@pytest.mark.slow
def test_a_reward_model_release_judges_whole_conversations_and_pair_prompts_hold_out_by_prompt(tmp_path):
    import ml_collections

    from llm.bpe import train_bpe
    from llm.tokenizer import Tokenizer

    hh = os.path.join(ROOT, "tests", "fixtures", "preference", "hh_rlhf_harmless_base_slice.jsonl")
    tok_path = str(tmp_path / "tok.tiktoken")
    train_bpe([line for line in open(hh)], 320, name="hh", progress=False).save(tok_path)
    tok = Tokenizer.load(tok_path)
    cfg = ModelConfig(family="llama", vocab_size=320, n_layer=1, n_embd=16, n_head=2, n_kv_head=1, mlp_dim=32,
                      max_seq_len=128, tie_embeddings=True)
    params = reward_model.init_params(cfg, jax.random.key(2))
    params["head"] = {"kernel": np.linspace(-1, 1, cfg.n_embd).astype(np.float32), "bias": np.float32(0.5)}
    reward_model.save(str(tmp_path / "judge"), cfg, jax.device_get(params), tok)
    data = ml_collections.ConfigDict({"pairs_kind": "jsonl", "path": hh, "held_out_fraction": 0.1})
    task = rlhf.pair_prompts(data)
    train, test = task.problems("train", 1000, 0), task.problems("test", 1000, 0)
    assert train and test and not {p.key for p in train} & {p.key for p in test}
    data.held_out_fraction = 0.3  # holds out more prompts, those of the smaller fraction among them
    more = {p.key for p in rlhf.pair_prompts(data).problems("test", 1000, 0)}
    assert more > {p.key for p in test}
    data.held_out_fraction = 1.0
    with pytest.raises(ValueError, match="held_out_fraction"):
        rlhf.pair_prompts(data)

    from llm.generate import Sample

    def reply(text):
        return Sample(tokens=[1] * len(text), logprobs=[0.0] * len(text), forced=[False] * len(text),
                      finish_reason="stop", text=text)

    judge = rlhf.make_judge(ml_collections.ConfigDict({"max_new_tokens": 16}),
                            ml_collections.ConfigDict({"judge": str(tmp_path / "judge")}), task)
    samples = [[reply("Sure."), reply("No way.")] for _ in test[:2]]
    expected = reward_model.RewardModel.load(str(tmp_path / "judge")).score(
        [[*p.messages, {"role": "assistant", "content": s.text}] for p, group in zip(test[:2], samples) for s in group],
        keep_end=True)
    np.testing.assert_allclose(judge(test[:2], samples), expected, rtol=1e-6)
    with pytest.raises(ValueError, match="needs a verifiable data.task"):
        rlhf.make_judge(ml_collections.ConfigDict({"max_new_tokens": 16}),
                        ml_collections.ConfigDict({"judge": "gold", "gold": "rule"}), task)
    gold = rlhf.make_judge(ml_collections.ConfigDict({"max_new_tokens": 16}),  # a reward model as the gold
                           ml_collections.ConfigDict({"judge": "gold", "gold": str(tmp_path / "judge")}), task)
    np.testing.assert_allclose(gold(test[:2], samples), expected, rtol=1e-6)

    # Gold-labelled pairs of a (fresh) policy's replies to pair prompts: the higher gold score chosen, the scores
    # the gold reward model's; prompts with no room for a reply in data.seq_len left out.
    from llm import model
    from llm.release import save_release

    save_release(str(tmp_path / "policy"), cfg, jax.device_get(model.init_params(cfg, jax.random.key(3))), tok)
    overrides = [f"--config.init_from={tmp_path / 'policy'}", "--config.data.task=pairs", f"--config.data.path={hh}",
                 "--config.data.seq_len=120",
                 "--config.rl.max_new_tokens=12", "--config.rl.require_stop=False",
                 f"--config.rlhf.gold={tmp_path / 'judge'}"]
    config = load_config(os.path.join(ROOT, "configs", "overoptimization_tiny.py"), overrides)
    records = rlhf.label_pairs(config, n_prompts=4, samples=3)
    assert records and all(r["gold_chosen"] > r["gold_rejected"] for r in records)
    judged = reward_model.RewardModel.load(str(tmp_path / "judge")).score(
        [[*r["prompt"], {"role": "assistant", "content": r[side]}] for r in records for side in ("chosen", "rejected")],
        keep_end=True)
    np.testing.assert_allclose(judged, [r[f"gold_{side}"] for r in records for side in ("chosen", "rejected")],
                               rtol=1e-5, atol=1e-6)
    assert all(len(tok.render_for_completion(r["prompt"])) + 12 <= 121 for r in records)
    with pytest.raises(ValueError, match="ask for 10008 held-out prompts; the task holds out"):
        rlhf.build(load_config(os.path.join(ROOT, "configs", "overoptimization_tiny.py"),
                               overrides + ["--config.rl.eval_problems=8", "--config.rlhf.gold_problems=10000",
                                            f"--config.rlhf.reward_model={tmp_path / 'judge'}"]), str(tmp_path / "x"))
