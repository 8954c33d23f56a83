"""Evaluation: pass@k, multiple-choice scoring, generative tasks, the report card."""

import dataclasses
import itertools
import json
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from hf_models import gpt2, llama

from llm import hf, model, sharding
from llm.bpe import read_texts, train_bpe
from llm.config import LOGICAL_AXES, SHARDING_PRESETS, ModelConfig
from llm.evals import bpb, generative
from llm.evals import multiple_choice as mc
from llm.evals.passk import mean_pass_at_k, pass_at_k
from llm.generate import SamplingParams, engine_for
from llm.tasks import MultipleChoice, choice_sets, gsm8k


def test_pass_at_k_equals_hand_values():
    # n=5 samples, c=2 right. pass@1 = c/n; pass@2 = 1 - C(3,2)/C(5,2) = 1 - 3/10; pass@5 = 1 (some right sample is drawn).
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)
    assert pass_at_k(5, 2, 5) == 1.0
    # c=0 can never pass; c=n always does.
    assert [pass_at_k(5, 0, k) for k in (1, 2, 5)] == [0.0, 0.0, 0.0]
    assert [pass_at_k(5, 5, k) for k in (1, 2, 5)] == [1.0, 1.0, 1.0]
    # n=4, c=1, k=2: 1 - C(3,2)/C(4,2) = 1 - 3/6.
    assert mean_pass_at_k([1, 0], n=4, k=2) == pytest.approx(0.25)


def test_pass_at_k_rejects_k_above_n():
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k(3, 1, 4)


# ----------------------------------------------------------------------------- multiple choice, generative, launch.eval

FIXTURES = Path(__file__).parent / "fixtures"
EVALS = FIXTURES / "evals"
SHARED = Path(__file__).parents[1] / ".." / "shared"


@pytest.fixture(scope="module")
def tiny_tok():
    """A 300-id BPE of ours, with the chat and calculator tokens."""
    return train_bpe(itertools.islice(read_texts(FIXTURES / "wikipedia_en_sample.jsonl"), 40), 300, name="tiny",
                     progress=False)


def _ours(torch_model, max_seq_len: int = 256):
    # transformers' Llama computes RoPE for any position, so our copy may read past max_position_embeddings too.
    cfg = dataclasses.replace(hf.model_config_from_hf(torch_model.config.to_dict()), max_seq_len=max_seq_len)
    state = {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}
    return cfg, jax.tree.map(jax.numpy.asarray, hf.params_from_hf(cfg, state))


def _reference_logliks(torch_model, tokenizer, item: MultipleChoice, max_len: int) -> tuple[list[float], bool]:
    """lm-evaluation-harness's rule written out directly on the transformers model, one sequence per choice."""
    context = item.context.rstrip()
    moved = item.context[len(context):]
    context_ids = tokenizer.encode(context)
    logliks, truncated = [], False
    for choice in item.choices:
        choice_ids = tokenizer.encode(item.context[: len(context)] + moved + choice)[len(context_ids):]
        ids = (context_ids + choice_ids)[-(max_len + 1):]
        truncated |= len(context_ids + choice_ids) - 1 > max_len
        with torch.no_grad():
            logits = torch_model(torch.tensor([ids[:-1]])).logits[0].double()
        logprobs = torch.log_softmax(logits, -1)
        targets = torch.tensor(ids[1:])
        picked = logprobs[torch.arange(len(targets)), targets][-len(choice_ids):]
        logliks.append(float(picked.sum()))
    return logliks, truncated


def _fixture_items():
    items = choice_sets.hellaswag(str(EVALS / "evals" / "hellaswag_val.jsonl"))
    items += choice_sets.arc(str(EVALS / "evals" / "arc_easy_validation.jsonl"))
    # A context that ends without its delimiter, and one whose choices are single letters.
    items.append(MultipleChoice("The sky is", (" blue.", " green.", " loud."), 0, key="no-delimiter"))
    items.append(MultipleChoice("2 + 2 = ", ("4", "5"), 0, key="letters"))
    return items


def _dp_mesh():
    rules = {axis: tuple(SHARDING_PRESETS["dp"].get(axis, ())) for axis in LOGICAL_AXES}
    return sharding.make_mesh(dict(data=-1, fsdp=1, tensor=1)), rules


@pytest.mark.slow
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_choice_logliks_equal_transformers_whatever_the_batching(family, tiny_tok):
    torch_model = gpt2(320, n_positions=256) if family == "gpt2" else llama(tie=False, rope_scaling=True, vocab_size=320)
    cfg, params = _ours(torch_model)
    items = _fixture_items()
    longest = max(len(r.ids) - 1 for r in mc.encode_requests(tiny_tok, items, 10_000))
    assert longest <= cfg.max_seq_len  # nothing is truncated below: the reference reads everything
    reference = [_reference_logliks(torch_model, tiny_tok, item, cfg.max_seq_len)[0] for item in items]

    mesh, rules = _dp_mesh()
    batched = mc.score(cfg, jax.device_put(params, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())),
                       tiny_tok, items, batch_rows=8, row_len=64, mesh=mesh, rules=rules)
    one_by_one = [s for item in items for s in mc.score(cfg, params, tiny_tok, [item], batch_rows=1, row_len=8)]
    at_the_edge = mc.score(cfg, params, tiny_tok, items, batch_rows=3, max_len=longest)  # truncation that does not bite
    for scores in (batched, one_by_one, at_the_edge):
        for got, want, item in zip(scores, reference, items):
            np.testing.assert_allclose(got.logliks, want, atol=1e-4, rtol=0, err_msg=item.key)
            assert got.pred == int(np.argmax(want)) and not got.truncated
            lengths = np.array([len(c) for c in item.choices], float)
            assert got.pred_norm == int(np.argmax(np.array(want) / lengths))
    # Batching and packing move scores by float rounding only, far below the parity tolerance.
    for a, b in zip(batched, one_by_one):
        np.testing.assert_allclose(a.logliks, b.logliks, atol=2e-5, rtol=0)
    summary = mc.summarize(batched)
    assert summary["items"] == len(items) and summary["truncated"] == 0
    assert summary["acc"] == np.mean([s.pred == item.label for s, item in zip(batched, items)])


def test_left_truncation_is_the_harness_rule_and_counted(tiny_tok):
    torch_model = gpt2(320, n_positions=256)
    cfg, params = _ours(torch_model)
    items = _fixture_items()
    max_len = 48
    scores = mc.score(cfg, params, tiny_tok, items, batch_rows=4, max_len=max_len)
    reference = [_reference_logliks(torch_model, tiny_tok, item, max_len) for item in items]
    for got, (want, truncated) in zip(scores, reference):
        np.testing.assert_allclose(got.logliks, want, atol=1e-4, rtol=0)
        assert got.truncated == truncated
    assert 0 < mc.summarize(scores)["truncated"] == sum(t for _, t in reference) < len(items)


def test_harness_token_split_and_acc_norm_by_characters(tiny_tok):
    item = MultipleChoice("Question: why?\nAnswer: ", ("because", "no"), 0)
    requests = mc.encode_requests(tiny_tok, [item], 100)
    context_ids = tiny_tok.encode("Question: why?\nAnswer:")
    for request, choice in zip(requests, item.choices):
        # The context's trailing space moves to the choice: the whole text's tokens past the context's.
        assert list(request.ids) == context_ids + tiny_tok.encode("Question: why?\nAnswer: " + choice)[len(context_ids):]
    # acc_norm divides by characters of the choice (without the delimiter): -6/2 beats -10/7 is false, -10/7 wins.
    scores = mc.ChoiceScores(logliks=(-10.0, -6.0), lengths=(7, 2), label=0)
    assert (scores.pred, scores.pred_norm) == (1, 0)
    with pytest.raises(ValueError, match="label 3 outside its 2 choices"):
        mc.encode_requests(tiny_tok, [MultipleChoice("x ", ("a", "b"), 3)], 100)


def test_readers_give_the_harness_prompts():
    [first, *_] = choice_sets.hellaswag(str(EVALS / "evals" / "hellaswag_val.jsonl"))
    assert first.context == "Making tea: A woman fills a kettle with water. She "  # ctx_b capitalised
    assert first.choices[1] == "paints the kettle. blue."  # " [title]" becomes ". ", as the harness does
    arc = choice_sets.arc(str(EVALS / "evals" / "arc_easy_validation.jsonl"))
    assert arc[0].context == "Question: Which technology was developed most recently?\nAnswer: "
    assert arc[0].choices == ("cellular telephone", "television", "refrigerator", "airplane") and arc[0].label == 0
    five = choice_sets.mmlu(str(EVALS / "evals" / "mmlu_test.jsonl"), dev=str(EVALS / "evals" / "mmlu_dev.jsonl"), shots=5)
    assert five[0].context.startswith("The following are multiple choice questions (with answers) about high school geography.\n\n")
    assert five[0].context.count("\nAnswer: ") == 6 and five[0].context.endswith("\nAnswer: ")
    assert five[0].choices == ("A", "B", "C", "D")
    chat = choice_sets.arc(str(EVALS / "evals" / "arc_easy_validation.jsonl"), chat=True)
    assert chat[0].messages[0]["content"].startswith("Which technology") and "\nD. airplane" in chat[0].messages[0]["content"]
    with pytest.raises(FileNotFoundError, match="not a Hugging Face dataset id"):
        choice_sets.arc("no/such/file.jsonl")


GSM8K_OUTPUTS = [
    ("She makes 9 * 2 = $18 every day.\n#### 18", "18"),
    ("#### $1,234", "1234"),
    ("So the total is 5 + 7 = 12.\n#### 12 eggs.", "12"),
    ("The answer is 42.", "42"),
    ("Therefore, the answer is $1,234.50 dollars.", "1234.5"),
    ("The final answer is: **-7**", "-7"),
    ("Answer: 3.0", "3"),
    ("First 3 + 4 = 7. The answer is 9, not 7.", "9"),
    ("#### 10\nThe answer is 11.", "10"),  # the #### line wins, as in the dataset's own format
    ("\\boxed{256}", "256"),
    # Must not match: numbers in the reasoning, no final answer.
    ("She sells 16 - 3 - 4 = 9 eggs at $2 each, which makes 18 dollars", None),
    ("Let me think. 48 / 2 = 24 clips in May, then 48 + 24 = 72", None),
    ("The answer is not clear from 3 and 4.", None),
    ("", None),
]


@pytest.mark.parametrize("text,expected", GSM8K_OUTPUTS)
def test_gsm8k_extraction(text, expected):
    assert gsm8k.extract_answer(text) == expected


def test_gsm8k_problems_and_grade():
    shots = choice_sets.read_records(str(EVALS / "gsm8k" / "train.jsonl"))
    problems = gsm8k.problems(str(EVALS / "gsm8k" / "test.jsonl"), fewshot=shots)
    assert [p.answer for p in problems] == ["18", "3", "70000", "540"]
    question = choice_sets.read_records(str(EVALS / "gsm8k" / "test.jsonl"))[0]["question"]
    assert problems[0].messages == ({"role": "user", "content": question},)
    assert problems[0].text.endswith(f"Question: {question}\nAnswer:")
    assert problems[0].text.count("Question: ") == 3 and "<<" not in problems[0].text
    assert gsm8k.grade(problems[2], "a profit of $70,000.\n#### 70,000") and not gsm8k.grade(problems[2], "#### 7000")


@pytest.mark.slow
def test_generative_eval_end_to_end_and_pass_at_k_from_the_grades(tiny_tok):
    cfg = ModelConfig(family="llama", vocab_size=300, n_layer=2, n_embd=64, n_head=4, n_kv_head=2, mlp_dim=128,
                      max_seq_len=128, rope_theta=10_000.0)
    params = model.init_params(cfg, jax.random.key(0))
    problems = gsm8k.problems(str(EVALS / "gsm8k" / "test.jsonl"))
    engine = engine_for(cfg, params, tiny_tok, tools=True)
    assert "python" in engine.tools

    def grade(problem, text):  # any deterministic rule of the text exercises the bookkeeping; the model is random
        return len(text) % 2 == 0

    result = generative.evaluate(engine, problems, grade, chat=True, n=3, ks=(1, 2, 3), temperature=1.0,
                                 max_new_tokens=6, batch_size=3)
    assert len(result.graded) == len(problems) and all(len(g.completions) == 3 for g in result.graded)
    counts = [sum(g.correct) for g in result.graded]
    assert [list(g.correct) for g in result.graded] == [[len(t) % 2 == 0 for t in g.completions] for g in result.graded]
    summary = result.summary()
    for k in (1, 2, 3):
        assert summary[f"pass@{k}"] == pytest.approx(np.mean([pass_at_k(3, c, k) for c in counts]))
    assert summary["pass@1"] == pytest.approx(sum(counts) / 12)
    base = generative.evaluate(engine, problems[:2], gsm8k.grade, chat=False, max_new_tokens=4,
                               stop_strings=gsm8k.STOP_STRINGS)
    too_long = sum(len(generative.prompt_ids(tiny_tok, p, chat=False)) > 128 - 4 for p in problems[:2])
    assert base.summary()["problems"] == 2 and base.summary()["truncated"] == too_long
    with pytest.raises(ValueError, match="k <= n"):
        generative.evaluate(engine, problems, grade, n=2, ks=(3,))

    # Each batch samples with seed + its first index, or (batch_seeds=False) with the seed itself; a completion cut
    # at max_new_tokens is wrong with require_stop; intervals and lengths come from the graded samples.
    sampling = SamplingParams(max_new_tokens=6, temperature=1.0, n=2, seed=5, stop_token_ids=tiny_tok.chat_stop_ids)
    prompts = [list(tiny_tok.render_for_completion(p.messages))[-(128 - 6):] for p in problems]  # as truncated
    for batch_seeds, seeds in ((True, (5, 7)), (False, (5, 5))):
        result = generative.evaluate(engine, problems, grade, n=2, ks=(1, 2), temperature=1.0, max_new_tokens=6,
                                     batch_size=2, seed=5, require_stop=True, batch_seeds=batch_seeds)
        expected = [s for start, seed in zip((0, 2), seeds) for s in
                    engine.generate(prompts[start:start + 2], dataclasses.replace(sampling, seed=seed))]
        assert [g.completions for g in result.graded] == [tuple(s.text for s in group) for group in expected]
        assert [g.correct for g in result.graded] == [tuple(grade(None, s.text) and s.finish_reason == "stop"
                                                            for s in group) for group in expected]
        summary = result.summary(intervals=True)
        assert summary["completion_len"] == pytest.approx(np.mean([len(s.tokens) for g in expected for s in g]))
        scores = [pass_at_k(2, sum(g.correct), 1) for g in result.graded]
        assert summary["pass@1_ci95"] == pytest.approx(1.96 * np.std(scores, ddof=1) / np.sqrt(len(scores)))


@pytest.mark.slow
def test_launch_eval_writes_a_report_card_equal_to_the_library_calls(tiny_tok, tmp_path, capsys):
    from launch import eval as launch_eval
    from llm.evals import registry
    from llm.release import save_release

    cfg = ModelConfig(family="gpt2", vocab_size=300, n_layer=2, n_embd=64, n_head=4, n_kv_head=4, mlp_dim=128,
                      max_seq_len=256)
    params = model.init_params(cfg, jax.random.key(1))
    save_release(str(tmp_path / "run" / "release"), cfg, params, tiny_tok)
    (tmp_path / "run" / "report.md").write_text("# sft report\n\n- loss: 1.0\n")  # the training stage's report
    (tmp_path / "run" / "metrics.jsonl").write_text("")  # its log: run/ is a training run's workdir
    launch_eval.main(["--checkpoint", str(tmp_path / "run" / "release"), "--tasks",
                      "hellaswag,arc_easy,mmlu_5shot,gsm8k,triviaqa,nq_open,spelling,bpb", "--limit", "4",
                      "--data-dir", str(EVALS), "--max-new-tokens", "8", "--shots", "1",
                      "--bpb-source", str(FIXTURES / "wikipedia_en_sample.jsonl"), "--bpb-val-fraction", "1",
                      "--bpb-batches", "2"])
    report = json.loads((tmp_path / "run" / "report.json").read_text())["tasks"]
    card = (tmp_path / "run" / "report.md").read_text()
    assert card.startswith("# sft report\n\n- loss: 1.0\n\n## Report card") and "| hellaswag | acc_norm |" in card
    assert "| arc_easy | acc |" in capsys.readouterr().out

    options = registry.Options(data_dir=str(EVALS), max_new_tokens=8, shots=1, limit=4)
    for name in ("hellaswag", "arc_easy", "mmlu_5shot"):
        task = registry.task(name, options)
        assert report[name] == mc.summarize(mc.score(cfg, params, tiny_tok, task.problems(task.eval_split, 0, 0)))
    for name in ("gsm8k", "triviaqa", "nq_open", "spelling"):
        task = registry.task(name, options)
        problems = task.problems(task.eval_split, 0, 0)
        assert len(problems) == (3 if name in ("triviaqa", "nq_open") else 4)
        expected = generative.evaluate(engine_for(cfg, params, tiny_tok, tools=True), problems, task.grade, chat=False,
                                       max_new_tokens=8, stop_strings=task.stop_strings).summary()
        assert report[name] == expected, name
    mesh, rules = _dp_mesh()
    assert report["bpb"] == bpb.bits_per_byte(cfg, params, tiny_tok, str(FIXTURES / "wikipedia_en_sample.jsonl"),
                                              mesh=mesh, rules=rules, batch_size=16, max_batches=2, val_fraction=1.0)
    assert 0 < report["bpb"]["val_bpb"] < 20


def test_report_goes_to_a_runs_workdir_else_here_never_into_a_models_folder(tmp_path):
    from launch.eval import report_dir

    run = tmp_path / "runs" / "sft"
    (run / "release").mkdir(parents=True)
    assert report_dir(str(run / "release")) == "."  # a folder named release/ is not yet a run of ours
    (run / "metrics.jsonl").write_text("")
    assert report_dir(str(run / "release")) == report_dir(f"{run}/release/") == str(run)
    (run / "metrics.jsonl").unlink()
    (run / "checkpoints").mkdir()
    assert report_dir(str(run / "release")) == str(run)
    models = tmp_path / "models"
    (models / "hub" / "models--o--m" / "snapshots" / "abc").mkdir(parents=True)
    (models / "m.Q4_1.gguf").write_bytes(b"GGUF")
    for downloaded in (models / "m.Q4_1.gguf", models, models / "hub" / "models--o--m" / "snapshots" / "abc",
                       "HuggingFaceTB/SmolLM2-135M", "bartowski/SmolLM2-135M-Instruct-GGUF:Q4_1"):
        assert report_dir(str(downloaded)) == "."


def test_launch_eval_leaves_a_models_folder_untouched(tiny_tok, tmp_path, monkeypatch, capsys):
    from launch import eval as launch_eval
    from llm.release import save_release

    cfg = ModelConfig(family="gpt2", vocab_size=300, n_layer=1, n_embd=32, n_head=2, n_kv_head=2, mlp_dim=64,
                      max_seq_len=128)
    folder = tmp_path / "downloads" / "tiny"
    save_release(str(folder), cfg, model.init_params(cfg, jax.random.key(0)), tiny_tok)
    before = sorted(p.name for p in folder.iterdir())
    folder.chmod(0o555)  # read-only (root writes anyway: the listing below is the check)
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    args = ["--checkpoint", str(folder), "--tasks", "arc_easy", "--limit", "2", "--data-dir", str(EVALS)]
    try:
        launch_eval.main(args)
        launch_eval.main([*args, "--out", str(tmp_path / "cards")])
    finally:
        folder.chmod(0o755)
    assert sorted(p.name for p in folder.iterdir()) == before
    for where in (here, tmp_path / "cards"):
        assert json.loads((where / "report.json").read_text())["tasks"]["arc_easy"]["items"] == 2
        assert "| arc_easy | acc |" in (where / "report.md").read_text()
    assert f"wrote {tmp_path / 'cards' / 'report.json'}" in capsys.readouterr().out


GGUF = SHARED / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.skipif(not GGUF.exists() or not (SHARED / "data" / "evals").exists(),
                    reason="needs ../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf and ../shared/data/evals")
@pytest.mark.slow
def test_smollm2_gguf_logliks_equal_transformers():
    import transformers

    from llm.release import load_release

    cfg, params, tokenizer = load_release(str(GGUF))
    torch_model = transformers.AutoModelForCausalLM.from_pretrained(
        str(GGUF.parent), gguf_file=GGUF.name, torch_dtype=torch.float32).eval()
    items = choice_sets.hellaswag(str(SHARED / "data" / "evals" / "hellaswag_val.jsonl"), limit=8)
    items += choice_sets.arc(str(SHARED / "data" / "evals" / "arc_easy_validation.jsonl"), limit=8)
    ours = mc.score(cfg, params, tokenizer, items, batch_rows=8)
    for got, item in zip(ours, items):
        want, _ = _reference_logliks(torch_model, tokenizer, item, cfg.max_seq_len)
        # Both dequantize the same Q4_1/Q8_0 blocks to float32, so only the float32 arithmetic differs: logits
        # agree to ~1e-4 relative, and a sum over ~20 tokens of log-probabilities of size ~1-10 to ~1e-3.
        np.testing.assert_allclose(got.logliks, want, atol=2e-3, rtol=1e-4, err_msg=item.key)
        assert got.pred == int(np.argmax(want))
        assert got.pred_norm == int(np.argmax(np.array(want) / np.array([len(c) for c in item.choices])))
