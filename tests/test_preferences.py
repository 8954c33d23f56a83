"""Learning from preferences: pair sources, the Bradley-Terry and DPO losses by hand, the reward model and its stage.

Small real slices live in tests/fixtures/preference and tests/fixtures/chat;
tests that read ../shared/data skip when it is absent.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm import model, reward_model
from llm.bpe import train_bpe
from llm.config import ModelConfig, load_config
from llm.data import pair_rows
from llm.data import preferences as prefs
from llm.tokenizer import Tokenizer
from llm.train import losses
from llm.train.step import train_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HH = os.path.join(ROOT, "tests", "fixtures", "preference", "hh_rlhf_harmless_base_slice.jsonl")
OASST = os.path.join(ROOT, "tests", "fixtures", "chat", "oasst1_en_slice.jsonl")
SHARED = os.path.join(os.path.dirname(ROOT), "shared", "data")
VOCAB = 384
CFG = ModelConfig(family="llama", vocab_size=VOCAB, n_layer=2, n_embd=32, n_head=4, n_kv_head=2, mlp_dim=64,
                  max_seq_len=128, tie_embeddings=True)


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    texts = [m["content"] for p in prefs.read_pairs(HH) for m in p.prompt] + [p.chosen for p in prefs.read_pairs(HH)]
    texts += ["Yes, gladly. Here it is.", "No. Go away."] * 5
    path = str(tmp_path_factory.mktemp("tok") / "pref.tiktoken")
    train_bpe(texts, VOCAB, name="pref", progress=False).save(path)
    return path


@pytest.fixture(scope="module")
def tok(tok_path):
    return Tokenizer.load(tok_path)


# ----------------------------------------------------------------------------- data


def test_hh_transcripts_split_into_prompt_and_the_two_last_replies():
    pairs = prefs.read_pairs(HH)
    assert len(pairs) + sum(pairs.skipped.values()) == 40
    first = pairs.items[0]
    assert first.prompt == ({"role": "user", "content": "Fyck of you fuck"},)
    assert first.chosen == "Sorry, I didn’t understand. Can you say that again?"
    assert first.rejected == "I’m sorry, what?"


def test_trl_shapes_and_bad_pairs_are_read_skipped_and_counted_or_raised(tmp_path):
    path = tmp_path / "pairs.jsonl"
    user = {"role": "user", "content": "Hi?"}
    lines = [
        {"prompt": "Hi?", "chosen": "Hello!", "rejected": "Go away."},  # explicit prompt, text replies
        {"prompt": [user], "chosen": [{"role": "assistant", "content": "Hello!"}],
         "rejected": [{"role": "assistant", "content": "No."}]},  # explicit prompt, message replies
        {"chosen": [user, {"role": "assistant", "content": "Hello!"}],
         "rejected": [user, {"role": "assistant", "content": "Bye."}]},  # implicit prompt: the shared prefix
        {"prompt": "Hi?", "chosen": "Same.", "rejected": "Same."},  # chosen equals rejected
        {"prompt": "Hi?", "chosen": "", "rejected": "No."},  # an empty side
        {"chosen": [user, {"role": "assistant", "content": "A"}],
         "rejected": [{"role": "user", "content": "Other?"}, {"role": "assistant", "content": "B"}]},  # differ early
        {"text": "no pair here"},
    ]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\nnot json\n")
    pairs = prefs.read_pairs(path)
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [
        ((user,), "Hello!", "Go away."), ((user,), "Hello!", "No."), ((user,), "Hello!", "Bye.")]
    assert pairs.skipped == {"chosen equals rejected": 1, "an empty side": 1, "malformed JSON": 1,
                             "the two sides differ before their last assistant reply": 1,
                             "not a preference pair (no chosen/rejected, or a transcript that does not parse)": 1}
    with pytest.raises(prefs.PreferenceError, match=r"pairs.jsonl:4: chosen equals rejected"):
        prefs.read_pairs(path, errors="raise")


def test_oasst_siblings_give_adjacent_ranked_pairs_with_the_path_as_prompt():
    pairs = prefs.read_oasst_pairs(OASST)
    rows = [json.loads(line) for line in open(OASST)]
    by_id = {r["message_id"]: r for r in rows}
    assert len(pairs) == 17
    for pair in pairs:
        better, worse = pair.key.split("(")[1].rstrip(")").split(" over ")
        assert by_id[better]["parent_id"] == by_id[worse]["parent_id"]
        assert by_id[worse]["rank"] == by_id[better]["rank"] + 1
        assert pair.chosen == by_id[better]["text"] and pair.rejected == by_id[worse]["text"]
        assert pair.prompt[-1]["content"] == by_id[by_id[better]["parent_id"]]["text"]
    train, val = prefs.split_pairs(pairs.items, 0.5)
    assert {p.group for p in train}.isdisjoint({p.group for p in val})  # one tree's pairs share a side


def test_hub_pairs_are_read_from_parquet_messages_jsonl_transcripts_and_oasst_rows(tmp_path, monkeypatch):
    import gzip
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    hh = prefs.read_pairs(HH)
    with open(HH, "rb") as f, gzip.open(tmp_path / "test.jsonl.gz", "wb") as g:  # Anthropic/hh-rlhf's layout
        shutil.copyfileobj(f, g)
    pq.write_table(pa.Table.from_pylist([  # ultrafeedback_binarized's layout: whole conversations per side
        {"prompt": p.prompt[-1]["content"], "chosen": [*p.prompt, {"role": "assistant", "content": p.chosen}],
         "rejected": [*p.prompt, {"role": "assistant", "content": p.rejected}]} for p in hh]),
        tmp_path / "train_prefs-0.parquet")
    rows = [json.loads(line) for line in open(OASST)]
    pq.write_table(pa.Table.from_pylist([{k: r[k] for k in ("message_id", "parent_id", "role", "text", "rank",
                                                            "deleted", "review_result", "message_tree_id")}
                                         for r in rows]), tmp_path / "validation-0.parquet")
    expected = {"test.jsonl.gz": [(p.prompt, p.chosen, p.rejected) for p in hh],
                "validation-0.parquet": [(p.prompt, p.chosen, p.rejected) for p in prefs.read_oasst_pairs(OASST)]}
    for name, want in expected.items():
        monkeypatch.setattr(prefs, "hub_dataset_files", lambda *a, name=name, **k: [str(tmp_path / name)])
        assert [(p.prompt, p.chosen, p.rejected) for p in prefs.read_hub_pairs("some/dataset")] == want
    monkeypatch.setattr(prefs, "hub_dataset_files", lambda *a, **k: [str(tmp_path / "train_prefs-0.parquet")])
    got = prefs.read_hub_pairs("some/dataset", "train_prefs")
    # whole conversations per side: their shared prefix is the prompt (the record's "prompt" is its last turn only)
    assert [(p.prompt, p.chosen, p.rejected) for p in got] == expected["test.jsonl.gz"]


def test_hub_pairs_offline_fail_with_a_clear_message(tmp_path):
    import subprocess
    import sys

    code = "from llm.data.preferences import read_hub_pairs\nread_hub_pairs('Anthropic/hh-rlhf', 'test')"
    env = {**os.environ, "PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "ConnectionError: cannot fetch Anthropic/hh-rlhf (split test)" in proc.stderr and "local files" in proc.stderr


def test_rendering_masks_only_the_reply_and_drops_pairs_longer_than_the_row(tok):
    pairs = prefs.read_pairs(HH).items[:6]
    rows = pair_rows.render_pairs(pairs, tok, 64)
    kept = {k: i for i, k in enumerate(rows.keys)}
    for pair in pairs:
        if pair.key not in kept:
            continue
        i = kept[pair.key]
        for side in ("chosen", "rejected"):
            tokens, mask = rows.arrays[f"{side}_tokens"][i], rows.arrays[f"{side}_mask"][i]
            n = rows.arrays[f"{side}_length"][i]
            prompt = tok.render_for_completion(pair.prompt)
            assert list(tokens[:len(prompt)]) == prompt and not mask[:len(prompt)].any()
            assert tok.decode(tokens[len(prompt):n][mask[len(prompt):n] > 0]).startswith(getattr(pair, side))
            assert tokens[n - 1] == tok.end_of_turn and mask[n - 1] == 1 and not mask[n:].any()
    short = pair_rows.render_pairs(pairs, tok, 24)
    assert len(short) + short.dropped["longer than the row"] == len(pairs) and short.dropped


# ----------------------------------------------------------------------------- losses by hand


def test_dpo_sequence_logprobs_sum_the_reply_tokens_and_length_normalisation_averages_them(tok):
    params = model.init_params(CFG, jax.random.key(0))
    rows = pair_rows.render_pairs(prefs.read_pairs(HH).items[:4], tok, 96)
    tokens, mask = jnp.asarray(rows.arrays["chosen_tokens"]), jnp.asarray(rows.arrays["chosen_mask"])
    every = losses.token_logprobs(CFG, params, {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]})
    expected = np.sum(np.asarray(every) * rows.arrays["chosen_mask"][:, 1:], axis=1)
    np.testing.assert_allclose(losses.sequence_logprobs(CFG, params, tokens, mask), expected, rtol=1e-5)
    np.testing.assert_allclose(losses.sequence_logprobs(CFG, params, tokens, mask, length_normalize=True),
                               expected / rows.arrays["chosen_mask"][:, 1:].sum(axis=1), rtol=1e-5)


# ----------------------------------------------------------------------------- the reward model


def _reward_params(seed=0):
    params = reward_model.init_params(CFG, jax.random.key(seed))
    params["head"] = {"kernel": 0.1 * jax.random.normal(jax.random.key(seed + 1), (CFG.n_embd,)),
                      "bias": jnp.float32(0.3)}
    return params


def test_a_score_is_the_same_alone_and_in_a_padded_batch_and_after_save_and_load(tok, tmp_path):
    params = _reward_params()
    conversations = [[{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": reply}]
                     for reply in ("Hello!", "Go away, I am busy today.", "No.")]
    rm = reward_model.RewardModel(CFG, params, tok)
    alone = np.concatenate([rm.score([c], batch_size=1) for c in conversations])
    together = rm.score(conversations, batch_size=4)
    np.testing.assert_allclose(together, alone, rtol=1e-5, atol=1e-6)
    ids = tok.render_conversation(conversations[1])[0]
    direct = reward_model.scores(CFG, params, jnp.asarray([ids]), jnp.asarray([len(ids)]))
    np.testing.assert_allclose(together[1], direct[0], rtol=1e-5)
    reward_model.save(str(tmp_path / "rm"), CFG, jax.device_get(params), tok)
    np.testing.assert_allclose(reward_model.RewardModel.load(str(tmp_path / "rm")).score(conversations), together,
                               rtol=1e-5, atol=1e-6)
    long = [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]
    with pytest.raises(ValueError, match="longer than the reward model's context"):
        rm.score([long])
    ids = tok.render_conversation(long)[0][-CFG.max_seq_len:]  # keep_end: the last tokens that fit
    np.testing.assert_allclose(rm.score([long], keep_end=True),
                               reward_model.scores(CFG, params, jnp.asarray([ids]), jnp.asarray([len(ids)])), rtol=1e-5)
    with pytest.raises(FileNotFoundError, match="not a reward-model release"):
        reward_model.RewardModel.load(str(tmp_path / "nothing"))


def test_the_frozen_backbone_reward_model_changes_only_the_head(tok):
    import optax

    rows = pair_rows.render_pairs(prefs.read_pairs(HH).items[:8], tok, 96)
    batch = {k: v[None] for k, v in rows.take(np.arange(4)).items()} | {"weights": np.ones((1, 4), np.float32)}
    params = _reward_params()
    loss_fn = lambda p, b, r: losses.reward_loss_fn(CFG, p, b, r)  # noqa: E731
    optimizer = optax.adam(1e-2)
    trainable = {"head": params["head"]}
    new, _, metrics = train_step(loss_fn, optimizer, params, optimizer.init(trainable), batch, jax.random.key(0),
                                 frozen=("backbone",))
    jax.tree.map(np.testing.assert_array_equal, new["backbone"], params["backbone"])
    assert not np.allclose(new["head"]["kernel"], params["head"]["kernel"])
    assert np.isfinite(float(metrics["loss"]))


# ----------------------------------------------------------------------------- the stage end to end


def _synthetic_pairs(path, n=48):
    """Pairs whose preference a model can learn in a few steps: a polite yes beats a rude no, whatever the prompt."""
    prompts = [m["content"] for p in prefs.read_pairs(HH) for m in p.prompt if m["role"] == "user"]
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"prompt": f"{prompts[i % len(prompts)]} (#{i})", "chosen": "Yes, gladly. Here it is.",
                                "rejected": "No. Go away."}) + "\n")


def _pair_config(config_file, tok_path, data, *overrides):
    """A tiny fresh model on the synthetic pairs, through the reward or DPO config."""
    return load_config(os.path.join(ROOT, "configs", config_file), [
        "--config.init_from=", f"--config.data.tokenizer={tok_path}", f"--config.model.vocab_size={VOCAB}",
        "--config.model.n_layer=2", "--config.model.n_embd=32", "--config.model.n_head=4",
        "--config.model.n_kv_head=2", "--config.model.mlp_dim=64", "--config.model.max_seq_len=128",
        "--config.data.seq_len=96", "--config.data.batch_size=8", "--config.data.val_fraction=0.25",
        f"--config.data.sources.hh_harmless.path={data}", f"--config.data.sources.oasst.path={OASST}",
        "--config.optimizer.learning_rate=3e-3", "--config.optimizer.warmup_steps=2", "--config.train.log_every=5",
        *overrides])


@pytest.mark.slow
def test_the_stage_learns_a_preference_and_releases_a_reward_model_that_scores(tok_path, tok, tmp_path, capsys):
    from llm.stages import reward

    data = tmp_path / "pairs.jsonl"
    _synthetic_pairs(data)
    config = _pair_config("reward_tiny.py", tok_path, data, "--config.train.steps=30", "--config.train.eval_every=30",
                            "--config.train.checkpoint_every=30")
    summary = reward.run(config, str(tmp_path / "run"))
    out = capsys.readouterr().out
    assert "reward data:" in out and "longer than the row" in out  # what was dropped, in the log
    first, last = summary.first_evals, summary.evals
    assert first["accuracy/hh_harmless"] == 0.5 and last["accuracy/hh_harmless"] == 1.0, (first, last)
    assert last["margin/hh_harmless"] > 1.0
    assert last["longer_wins/hh_harmless"] == 1.0  # the chosen reply is the longer one in every synthetic pair
    rm = reward_model.RewardModel.load(str(tmp_path / "run" / "release"))
    user = {"role": "user", "content": "Can you help me? (#999)"}
    polite, rude = rm.score([[user, {"role": "assistant", "content": "Yes, gladly. Here it is."}],
                             [user, {"role": "assistant", "content": "No. Go away."}]])
    assert polite > rude
    assert "accuracy/hh_harmless" in open(tmp_path / "run" / "report.md").read()


@pytest.mark.skipif(not os.path.isdir(os.path.join(SHARED, "preference")),
                    reason="../shared/data/preference (HH-RLHF harmless-base) is not on this machine")
def test_the_shared_hh_rlhf_and_oasst_files_read_with_few_skips():
    hh = prefs.read_pairs(os.path.join(SHARED, "preference", "hh_rlhf_harmless_base_test.jsonl.gz"))
    oasst = prefs.read_oasst_pairs(os.path.join(SHARED, "chat", "oasst1_en_validation.jsonl"))
    assert len(hh) == 2303 and sum(hh.skipped.values()) == 9
    assert len(oasst) == 711


# ----------------------------------------------------------------------------- DPO


def test_dpo_reference_logprobs_are_the_starting_policy_s_and_the_same_on_eight_devices(tok_path, tok):
    from llm import sharding
    from llm.stages import dpo

    params = jax.tree.map(np.asarray, model.init_params(CFG, jax.random.key(3)))
    rows = pair_rows.render_pairs(prefs.read_pairs(HH).items[:11], tok, 97)  # 11 pairs: batches of 4 end padded
    direct = np.asarray(losses.sequence_logprobs(CFG, params, jnp.asarray(rows.arrays["chosen_tokens"]),
                                                 jnp.asarray(rows.arrays["chosen_mask"])))
    for shape in ({"data": 1, "fsdp": 1, "tensor": 1}, {"data": 2, "fsdp": 2, "tensor": 2}):
        mesh = sharding.make_mesh(shape, devices=jax.devices()[:int(np.prod(list(shape.values())))])
        rules = dict(load_config(os.path.join(ROOT, "configs", "dpo_tiny.py"), []).sharding)
        import functools

        logp_fn = jax.jit(functools.partial(dpo._pair_logprobs, CFG, mesh, rules, False))
        placed = sharding.place_host(params, sharding.param_shardings(model.param_axes(CFG), params, mesh, rules))
        dpo.add_reference_logprobs(logp_fn, placed, rows, 4, mesh, rules)
        np.testing.assert_allclose(rows.arrays["ref_chosen_logp"], direct, rtol=1e-5)


@pytest.mark.slow
def test_dpo_raises_the_held_out_margin_and_reports_the_chosen_log_probability(tok_path, tmp_path, capsys):
    from llm.stages import dpo

    data = tmp_path / "pairs.jsonl"
    _synthetic_pairs(data)
    config = _pair_config("dpo_tiny.py", tok_path, data, "--config.train.steps=20", "--config.train.eval_every=20",
                         "--config.train.checkpoint_every=20", "--config.dpo.beta=0.5")
    summary = dpo.run(config, str(tmp_path / "run"))
    assert "dpo data:" in capsys.readouterr().out
    first, last = summary.first_evals, summary.evals
    # At step 0 the policy is the reference: every implicit reward is 0 (up to float32 rounding).
    assert abs(first["margin/hh_harmless"]) < 1e-4 and abs(first["chosen_reward/hh_harmless"]) < 1e-4
    assert last["margin/hh_harmless"] > 1.0 and last["accuracy/hh_harmless"] == 1.0, (first, last)
    assert "chosen_logp/hh_harmless" in last and "rejected_logp/hh_harmless" in last
    assert last["rejected_logp/hh_harmless"] < first["rejected_logp/hh_harmless"]
    cfg, _, _ = load_release_dir(tmp_path / "run" / "release")
    assert cfg.vocab_size == VOCAB


def load_release_dir(path):
    from llm.release import load_release

    return load_release(str(path))
