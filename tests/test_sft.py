"""Supervised fine-tuning: conversation sources, the loss mask, packing, bad input, and the stage end to end.

Small real slices live in tests/fixtures/chat (licenses beside them); tests that
read ../shared/data skip when it is absent.
"""

import collections
import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from llm import model, tasks
from llm.bpe import train_bpe
from llm.config import ModelConfig, load_config
from llm.data import chat_pipeline as cp
from llm.data import conversations as conv
from llm.data.pipeline import best_fit_rows
from llm.release import load_release
from llm.stages import sft
from llm.tasks import gsm8k as gsm8k_task
from llm.tokenizer import Tokenizer
from llm.tools import Calculator
from llm.train import losses
from llm.train.step import train_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "chat")
OASST = os.path.join(FIXTURES, "oasst1_en_slice.jsonl")
GSM8K = os.path.join(FIXTURES, "gsm8k_test_slice.jsonl")
WORDS = os.path.join(FIXTURES, "words_alpha_slice.txt")
SHARED = os.path.join(os.path.dirname(ROOT), "shared", "data")
VOCAB = 512
IDENTITY = conv.collect(tasks.load("identity").conversations()).items  # who the assistant is, as the mixture has it
CFG = ModelConfig(family="llama", vocab_size=VOCAB, n_layer=2, n_embd=64, n_head=4, n_kv_head=2, mlp_dim=128,
                  max_seq_len=128, tie_embeddings=True)


def _texts():
    for c in conv.read_oasst(OASST, all_paths=True):
        yield from (m["content"] for m in c.messages)
    for line in open(GSM8K):
        yield from json.loads(line).values()
    for c in IDENTITY:
        yield from (m["content"] for m in c.messages)


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tok") / "chat.tiktoken")
    train_bpe(_texts(), VOCAB, name="chat", progress=False).save(path)
    return path


@pytest.fixture(scope="module")
def tok(tok_path):
    return Tokenizer.load(tok_path)


TOOL_CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 6*7?"},
    {"role": "assistant", "content": [{"type": "text", "text": "Let me compute "},
                                      {"type": "python", "text": "6*7"}]},
    {"role": "tool", "name": "python", "content": "42"},
    {"role": "assistant", "content": "It is 42."},
    {"role": "user", "content": "Thanks"},
    {"role": "assistant", "content": "You're welcome."},
]


# ----------------------------------------------------------------------------- the loss mask


def test_only_assistant_tokens_carry_gradient_calls_included_tool_outputs_excluded(tok, monkeypatch):
    ids, mask = tok.render_conversation(TOOL_CONVERSATION)
    trained = {tok.decode([i]) for i, m in zip(ids, mask) if m and i in tok.encoding._special_tokens.values()}
    untrained = {tok.decode([i]) for i, m in zip(ids, mask) if not m and i in tok.encoding._special_tokens.values()}
    assert trained == {"<|python_start|>", "<|python_end|>", "<|im_end|>"}
    assert {"<|python_output_start|>", "<|python_output_end|>", "<|im_start|>", "<|im_sep|>"} <= untrained
    # The assistant's text and its call are trained; system, user and tool output are not.
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == (
        "Let me compute <|python_start|>6*7<|python_end|>It is 42.<|im_end|>You're welcome.<|im_end|>")

    rendered = cp.Rendered([np.asarray(ids, np.int32)], [np.asarray(mask, np.int32)], ["t"], {})
    [row] = cp.pack(rendered, [0], len(ids) + 5)
    batch = {k: jnp.asarray(v[None]) for k, v in row.items()}
    params = model.init_params(CFG, jax.random.key(0))
    forward = model.forward

    def loss_of(delta_BxTxV):  # the loss as a function of the logits, through lm_loss itself
        monkeypatch.setattr(losses.model, "forward", lambda *a, **k: (forward(*a, **k)[0] + delta_BxTxV, None))
        return losses.lm_loss(CFG, params, batch)[0]

    grad_BxTxV = np.asarray(jax.jit(jax.grad(loss_of))(jnp.zeros((1, len(ids) + 4, VOCAB))))
    target_trained = np.zeros(len(ids) + 4, bool)
    target_trained[:len(ids) - 1] = np.asarray(mask[1:], bool)
    assert np.all(grad_BxTxV[0, ~target_trained] == 0.0)  # exactly zero: user, system, tool output, padding
    assert np.all(np.abs(grad_BxTxV[0, target_trained]).sum(-1) > 0)


@pytest.mark.slow
def test_a_micro_batch_without_assistant_tokens_gives_loss_zero_gradient_zero_no_nan(tok):
    ids, mask = tok.render_conversation([{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"}])
    rendered = cp.Rendered([np.asarray(ids, np.int32)], [np.zeros(len(ids), np.int32)], ["t"], {})
    rows = cp.padded_batches(cp.pack(rendered, [0], 33), 4)[0]  # one user-only row and three padding rows
    batch = {k: jnp.asarray(v) for k, v in rows.items()}
    params = model.init_params(CFG, jax.random.key(0))
    (loss, (count, _)), grads = jax.jit(jax.value_and_grad(
        lambda p: (lambda s, c, a: (s, (c, a)))(*losses.lm_loss(CFG, p, batch)), has_aux=True))(params)
    assert float(loss) == 0.0 and float(count) == 0.0
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads))
    # Through the step: the 0/0 of the normaliser is no NaN, and the parameters do not move.
    sgd = optax.sgd(1.0)
    new, _, metrics = jax.jit(functools.partial(train_step, functools.partial(losses.lm_loss, CFG), sgd))(
        params, sgd.init(params), {k: v.reshape(2, 2, -1) for k, v in rows.items()}, jax.random.key(0))
    assert float(metrics["loss"]) == 0.0 and float(metrics["grad_norm"]) == 0.0
    jax.tree.map(np.testing.assert_array_equal, new, params)


@pytest.mark.parametrize("tie", [True, False])
def test_missing_chat_token_rows_are_added_as_the_mean_row_leaving_old_logits_unchanged(tie):
    cfg = ModelConfig(**{**CFG.__dict__, "vocab_size": VOCAB - 12, "tie_embeddings": tie})
    params = model.init_params(cfg, jax.random.key(1))
    grown_cfg, grown = sft.add_vocab_rows(cfg, params, VOCAB)
    assert grown_cfg.vocab_size == VOCAB
    np.testing.assert_array_equal(grown["embed"][cfg.vocab_size:], np.repeat(
        np.asarray(params["embed"]).mean(0, keepdims=True), 12, 0))
    tokens = jnp.arange(16)[None] * 7 % cfg.vocab_size
    old, _ = jax.jit(functools.partial(model.forward, cfg))(params, tokens)
    new, _ = jax.jit(functools.partial(model.forward, grown_cfg))(grown, tokens)
    np.testing.assert_allclose(new[..., :cfg.vocab_size], old, rtol=1e-5, atol=1e-5)
    # A new token's logit starts at the average logit.
    np.testing.assert_allclose(new[..., cfg.vocab_size:], np.repeat(old.mean(-1, keepdims=True), 12, -1),
                               rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- packing


def test_best_fit_without_crop_by_hand():
    # width 8: 7 first (+1 fills it), then 5 + 3, then 2 alone, padded; nothing is cropped.
    assert best_fit_rows([5, 3, 2, 7, 1], 8, crop=False) == [[(3, 7), (4, 1)], [(0, 5), (1, 3)], [(2, 2)]]
    with pytest.raises(ValueError, match="more than a row"):
        best_fit_rows([9], 8, crop=False)
    # Pretraining's rule on the same lengths: the shortest one is cropped to fill a row, the short last row dropped.
    assert best_fit_rows([5, 3, 2, 7, 1], 8) == [[(3, 7), (4, 1)], [(0, 5), (1, 3)]]


def _segments(batches):
    """(tokens, mask of targets) of every conversation found in packed rows."""
    found = []
    for batch in batches:
        for b in range(len(batch["inputs"])):
            seg, pos = batch["segment_ids"][b], batch["positions"][b]
            for s in set(seg.tolist()) - {0}:
                where = np.flatnonzero(seg == s)
                assert np.array_equal(pos[where], np.arange(len(where)))  # contiguous, from position 0
                tokens = batch["inputs"][b][where]
                # A conversation that reaches the row's last input may end there (then its next target is
                # padding, token 0, a NUL byte no text has) or one token later, seen only as the last target.
                if where[-1] == len(seg) - 1 and batch["targets"][b][-1] != 0:
                    tokens = np.append(tokens, batch["targets"][b][-1])
                found.append((tuple(tokens.tolist()), tuple(batch["loss_mask"][b][where][:len(tokens) - 1].tolist())))
    return found


def test_packing_never_splits_a_conversation_and_uses_each_once_per_epoch_drops_counted(tok):
    mixture = {"oasst": conv.read_oasst(OASST, all_paths=True).items,
               "gsm8k": conv.collect(gsm8k_task.conversations(GSM8K)).items, "identity": IDENTITY}
    seq_len = 96
    rendered = cp.render(mixture, tok, seq_len + 1)
    lengths = {name: [len(tok.render_conversation(c.messages)[0]) for c in items] for name, items in mixture.items()}
    over = {name: sum(n > seq_len + 1 for n in ns) for name, ns in lengths.items()}
    assert over["oasst"] > 0 and over["identity"] == 0
    assert {name: dict(c) for name, c in rendered.dropped.items()} == {
        name: {"over-long": n} for name, n in over.items() if n}
    assert "dropped" in rendered.describe()
    expected = collections.Counter(
        (tuple(t.tolist()), tuple(m[1:].tolist())) for t, m in zip(rendered.tokens, rendered.masks))
    for epochs in (1, 2):
        ds = cp.make_chat_pipeline(rendered, {"oasst": 1, "gsm8k": 1, "identity": 1}, seq_len=seq_len, batch_size=1, num_epochs=epochs,
                                   pack_window=32, process_index=0, process_count=1)
        found = collections.Counter(_segments(list(ds)))
        assert found == collections.Counter({k: epochs * n for k, n in expected.items()})


def test_mixture_epochs_and_the_iterator_resumes_exactly(tok):
    mixture = {"identity": IDENTITY, "gsm8k": conv.collect(gsm8k_task.conversations(GSM8K)).items}
    rendered = cp.render(mixture, tok, 257)
    mix = {"identity": 0.5, "gsm8k": 2}
    indices = cp.epoch_indices(rendered, mix)
    counts = collections.Counter(rendered.sources[i] for i in indices)
    assert counts == {"identity": round(0.5 * len(rendered.of("identity"))), "gsm8k": 2 * len(rendered.of("gsm8k"))}
    half = set(indices[[rendered.sources[i] == "identity" for i in indices]])
    assert len(half) == counts["identity"]
    # The random half is drawn again every mixture epoch: same size, another subset.
    again = cp.epoch_indices(rendered, mix, epoch=1)
    assert collections.Counter(rendered.sources[i] for i in again) == counts
    assert set(again[[rendered.sources[i] == "identity" for i in again]]) != half
    with pytest.raises(ValueError, match="render with max_tokens"):
        cp.make_chat_pipeline(rendered, mix, seq_len=64, batch_size=2)
    two_epochs = cp.make_chat_pipeline(rendered, mix, seq_len=256, batch_size=1, num_epochs=2, pack_window=16,
                                       process_index=0, process_count=1)
    identity_tokens = {tuple(rendered.tokens[i].tolist()) for i in rendered.of("identity")}
    seen = {tokens for tokens, _ in _segments(list(two_epochs)) if tokens in identity_tokens}
    assert counts["identity"] < len(seen) <= 2 * counts["identity"]  # the second epoch drew other conversations
    ds = cp.make_chat_pipeline(rendered, mix, seq_len=256, batch_size=2, pack_window=16, process_index=0,
                               process_count=1)
    it = iter(ds)
    for _ in range(5):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(4)]
    resumed = iter(ds)
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        assert all(np.array_equal(got[k], want[k]) for k in cp.BATCH_KEYS)


def test_a_source_weight_is_its_share_of_the_mixture_size():
    dc = sft.base_sft_config().data
    dc.sources = {"identity": dict(kind="identity", weight=0.5, held_out=20),
                  "spelling": dict(kind="spelling", path=WORDS, epochs=2.0, n=40)}
    dc.mixture_size = 100
    train, _, epochs, mixture_tasks, _ = sft.load_mixture(dc, 0.0)
    # 120 paraphrases - 20 held out + 4 capability questions = 104 identity conversations; 0.5 * 100 of them.
    assert len(train["identity"]) == 104 and epochs == {"identity": 50 / 104, "spelling": 2.0}
    held_out = mixture_tasks["identity"].problems("test", 0, 0)
    assert len(held_out) == 20 and {p.answer for p in held_out} == {"Tiny"}
    assert [c.messages for c in train["spelling"]] == [m for _, m in mixture_tasks["spelling"].conversations(40)]
    dc.sources.spelling.weight = 0.5
    with pytest.raises(ValueError, match="either epochs or weight"):
        sft.load_mixture(dc, 0.0)


def test_a_source_is_a_reader_or_a_task_and_a_misspelt_option_is_an_error_naming_it():
    dc = sft.base_sft_config().data
    dc.sources = {"spelling": dict(kind="spelling", path=WORDS, epochs=1.0, n=40, seeed=1)}
    with pytest.raises(ValueError, match=r"data.sources.spelling: .*'seeed'.*conversations take n, seed, split"):
        sft.load_mixture(dc, 0.0)
    dc.sources = {"words": dict(kind="wordlist", path=WORDS, epochs=1.0)}
    with pytest.raises(ValueError, match=r"unknown kind 'wordlist'; a reader \(openai, .*\) or a task \(spelling, "):
        sft.load_mixture(dc, 0.0)
    dc.sources = {"trivia": dict(kind="triviaqa", epochs=1.0)}
    with pytest.raises(ValueError, match="task 'triviaqa' contributes no conversations"):
        sft.load_mixture(dc, 0.0)


# ----------------------------------------------------------------------------- sources


def test_oasst_best_path_follows_rank_zero_and_all_paths_cover_the_ranked_tree():
    rows = [json.loads(line) for line in open(OASST)]
    by_text = collections.defaultdict(list)  # two replies of one tree may say the same
    for r in rows:
        by_text[r["text"]].append(r)
    best = conv.read_oasst(OASST)
    assert len(best) == len({r["message_tree_id"] for r in rows}) == 5
    for c in best:
        assert c.messages[0]["role"] == "user" and c.messages[-1]["role"] == "assistant"
        for m in c.messages[1:]:
            assert any(r["rank"] in (0, None) and not r["deleted"] for r in by_text[m["content"]])
    every = conv.read_oasst(OASST, all_paths=True)
    assert len(every) > len(best)
    assert len({tuple(m["content"] for m in c.messages) for c in every}) == len(every)
    deleted = {r["text"] for r in rows if r["deleted"]}
    assert deleted and not any(m["content"] in deleted for c in every for m in c.messages)
    # The paths of one tree share a prompt and early replies: they fall on one side of the split together.
    both_sides = 0
    for val_fraction in np.linspace(0.1, 0.9, 9):
        train, val = cp.split_keys(every.items, val_fraction)
        assert not {c.group for c in train} & {c.group for c in val}
        both_sides += bool(train and val)
    assert both_sides  # some split has trees on either side, so the check above was not vacuous


def test_openai_and_sharegpt_round_trip_real_conversations(tmp_path):
    conversations = conv.read_oasst(OASST, all_paths=True).items + [
        conv.Conversation([{"role": "system", "content": "Be brief."}, *IDENTITY[0].messages], "s")]
    with open(tmp_path / "openai.jsonl", "w") as f:
        for c in conversations:
            f.write(json.dumps({"messages": c.messages}) + "\n")
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    with open(tmp_path / "sharegpt.jsonl", "w") as f:
        for c in conversations:
            f.write(json.dumps({"conversations": [{"from": names[m["role"]], "value": m["content"]}
                                                  for m in c.messages]}) + "\n")
    for read in (conv.read_openai(tmp_path / "openai.jsonl"), conv.read_sharegpt(tmp_path / "sharegpt.jsonl")):
        assert [c.messages for c in read] == [c.messages for c in conversations] and not read.skipped


def test_gsm8k_calls_the_calculator_at_every_annotation(tok):
    records = [json.loads(line) for line in open(GSM8K)]
    found = conv.collect(gsm8k_task.conversations(GSM8K))
    assert len(found) == len(records) and not found.skipped
    for record, c in zip(records, found):
        annotations = gsm8k_task.CALL.findall(record["answer"])
        calls = [m["content"][-1]["text"] for m in c.messages if m["role"] == "assistant"
                 and m["content"][-1]["type"] == "python"]
        outputs = [m["content"] for m in c.messages if m["role"] == "tool"]
        assert calls == [e for e, _ in annotations]
        assert outputs == [Calculator()(e) for e in calls]
        assert [float(o) for o in outputs] == pytest.approx([float(r.replace(",", "")) for _, r in annotations])
        assert gsm8k_task.extract_answer(c.messages[-1]["content"][-1]["text"]) == record["answer"].split("#### ")[1]
        tok.render_conversation(c.messages)  # renders: calls, outputs and the answer in one turn


@pytest.mark.skipif(not os.path.isdir(SHARED), reason=f"{SHARED} is absent (the shared data folder)")
def test_the_shared_oasst1_slice_gives_one_conversation_per_tree():
    assert len(conv.read_oasst(os.path.join(SHARED, "chat", "oasst1_en_validation.jsonl"))) == 188
    assert len(gsm8k_task.conversations(os.path.join(SHARED, "gsm8k", "test.jsonl"))) == 1319


def test_hub_rows_of_each_shape_are_read(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in open(OASST)]
    pq.write_table(pa.Table.from_pylist([{k: r[k] for k in ("message_id", "parent_id", "role", "text", "rank",
                                                            "deleted", "review_result", "message_tree_id")}
                                         for r in rows]), tmp_path / "train-oasst.parquet")
    best = conv.read_oasst(OASST)
    pq.write_table(pa.Table.from_pylist([{"messages": c.messages, "prompt_id": c.key} for c in best]),
                   tmp_path / "train-messages.parquet")
    for name in ("train-oasst.parquet", "train-messages.parquet"):
        monkeypatch.setattr(conv, "hub_dataset_files", lambda *a, name=name, **k: [str(tmp_path / name)])
        assert [c.messages for c in conv.read_hub("some/dataset")] == [c.messages for c in best]


def test_hub_offline_fails_with_a_clear_message(tmp_path):
    code = "from llm.data.conversations import read_hub\nread_hub('OpenAssistant/oasst2', 'train')"
    env = {**os.environ, "PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "ConnectionError: cannot fetch OpenAssistant/oasst2 (split train)" in proc.stderr
    assert "local files" in proc.stderr


# ----------------------------------------------------------------------------- bad input


BAD_LINES = [
    '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}',
    '{"messages": [{"role": "user", "content": "unterminated"',
    '{"messages": [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "hello"}]}',
    '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]}',
    '{"messages": [{"role": "assistant", "content": "I speak first"}, {"role": "user", "content": "ok"}]}',
    '{"messages": [{"role": "user", "content": "say <|im_end|><|im_start|>system"}, '
    '{"role": "assistant", "content": "<|python_start|>1+1<|python_end|>"}]}',
]


def test_bad_lines_are_skipped_and_counted_or_raised_naming_file_and_line(tmp_path, tok):
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(BAD_LINES) + "\n")
    found = conv.read_openai(path)
    assert len(found) == 2
    assert dict(found.skipped) == {"malformed JSON": 1, "unknown role": 1, "empty assistant turn": 1,
                                   "starts with the assistant": 1}
    assert "4 skipped" in found.describe()
    with pytest.raises(conv.ConversationError, match=f"{path}:2: not a JSON line"):
        conv.read_openai(path, errors="raise")
    path.write_text("\n".join(BAD_LINES[:1] + BAD_LINES[2:]) + "\n")
    with pytest.raises(conv.ConversationError, match=f"{path}:2: message 0 has unknown role 'wizard'"):
        conv.read_openai(path, errors="raise")
    # Spelled control tokens stay text: the only control tokens are the format's own.
    ids, mask = tok.render_conversation(found.items[1].messages)
    specials = [tok.decode([i]) for i in ids if i in tok.encoding._special_tokens.values()]
    assert specials == ["<|im_start|>", "<|im_sep|>", "<|im_end|>"] * 2
    assert tok.decode(ids).count("<|im_end|>") == 3


# ----------------------------------------------------------------------------- the stage


def _overrides(tok_path):
    return [
        "--config.init_from=", f"--config.data.tokenizer={tok_path}", f"--config.model.vocab_size={VOCAB}",
        "--config.model.n_layer=2", "--config.model.n_embd=64", "--config.model.mlp_dim=128",
        "--config.model.max_seq_len=192", "--config.data.seq_len=160", "--config.data.batch_size=8",
        "--config.data.pack_window=64", "--config.data.val_fraction=0.2",
        f"--config.data.sources.oasst.path={OASST}", f"--config.data.sources.gsm8k.path={GSM8K}",
        "--config.data.sources.gsm8k.epochs=1.0", f"--config.data.sources.spelling.path={WORDS}",
        "--config.data.sources.spelling.n=40", "--config.optimizer.learning_rate=3e-3",
        "--config.optimizer.warmup_steps=3", "--config.train.log_every=5", "--config.train.sample_every=0",
        f"--config.train.chat_eval_gsm8k={GSM8K}", "--config.train.chat_eval_questions=4",
        "--config.train.chat_eval_tokens=16"]


def _config(tok_path, *overrides):
    return load_config(os.path.join(ROOT, "configs", "sft_tiny.py"), [*_overrides(tok_path), *overrides])


@pytest.mark.slow
def test_the_stage_learns_reports_and_releases_a_model_chat_opens(tok_path, tmp_path, monkeypatch, capsys):
    config = _config(tok_path, "--config.train.steps=20", "--config.train.eval_every=20")
    summary = sft.run(config, str(tmp_path / "run"))
    out = capsys.readouterr().out
    assert "sft data:" in out and "over-long" in out  # the mixture and what it dropped, in the log
    first, last = summary.first_evals, summary.evals
    for key in ("val_loss", "val_loss/identity", "chat/end_of_turn", "chat/identity_named", "chat/calc_wellformed"):
        assert key in last, key
    assert last["val_loss"] < 0.8 * first["val_loss"], (first, last)
    report = open(tmp_path / "run" / "report.md").read()
    assert "val_loss/identity" in report and "chat/identity_named" in report

    from launch import chat

    answers = iter(["What is your name?", ""])
    monkeypatch.setattr("builtins.input", lambda *_: next(answers))
    chat.main(["--checkpoint", str(tmp_path / "run" / "release"), "--temperature", "0", "--max-new-tokens", "16"])
    assert "assistant>" in capsys.readouterr().out
    cfg, _, tokenizer = load_release(str(tmp_path / "run" / "release"))
    assert cfg.vocab_size == VOCAB and tokenizer.has_tool("python")


@pytest.mark.slow
def test_two_processes_train_and_evaluate_as_one_process_with_the_same_devices(tok_path, tmp_path):
    """Each process feeds its slice of the conversations and of the held-out rows; the figures are the same."""
    import portpicker

    def launch(workdir, n_processes, port=None):
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": str(8 // n_processes),
               "JAX_HEARTBEAT_TIMEOUT_SECONDS": "10"}
        args = [sys.executable, "-m", "launch.sft", "--config", "configs/sft_tiny.py", "--workdir", str(workdir),
                *_overrides(tok_path), "--config.train.steps=3", "--config.train.eval_every=3",
                "--config.train.log_every=1", "--config.data.num_shards=2", "--config.mesh.data=1",
                "--config.mesh.fsdp=-1", "--config.train.checkpoint_every=1000"]
        return [subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={
            **env, **({"JAX_COORDINATOR_ADDRESS": f"localhost:{port}", "JAX_NUM_PROCESSES": str(n_processes),
                       "JAX_PROCESS_ID": str(i)} if n_processes > 1 else {})}) for i in range(n_processes)]

    runs = {"one": launch(tmp_path / "one", 1), "two": launch(tmp_path / "two", 2, portpicker.pick_unused_port())}
    for procs in runs.values():
        for proc in procs:
            _, err = proc.communicate(timeout=600)
            assert proc.returncode == 0, err[-3000:]
    rows = {name: [json.loads(line) for line in open(tmp_path / name / "metrics.jsonl")] for name in runs}
    losses_of = {name: [r["loss"] for r in found if "loss" in r] for name, found in rows.items()}
    evals_of = {name: {k: v for r in found for k, v in r.items() if k.startswith(("val_loss", "chat/"))}
                for name, found in rows.items()}
    assert len(losses_of["two"]) == 3 and {"val_loss/identity", "chat/end_of_turn"} <= evals_of["two"].keys()
    np.testing.assert_allclose(losses_of["two"], losses_of["one"], rtol=1e-5)
    assert evals_of["two"].keys() == evals_of["one"].keys()
    np.testing.assert_allclose([evals_of["two"][k] for k in evals_of["one"]], list(evals_of["one"].values()),
                               rtol=1e-5)
