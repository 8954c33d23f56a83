"""The sampling engine: cache-exact greedy decoding, sampling rules, stop strings, tool calls."""

import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from hf_models import gpt2, llama
from scripted import TOKENIZER, script, scripted_gpt2

from llm import hf, model
from llm.chat_format import tool_tokens
from llm.config import ModelConfig
from llm.cpu_layout import CPU_LAYOUT, LayerCache
from llm.engine_steps import STACKED
from llm.generate import Engine, SamplingParams, engine_for
from llm.sampling import process_logits, sample_tokens, top_k_by_blocks
from llm.tools import Calculator, Search

SMALL = ModelConfig(family="llama", vocab_size=96, n_layer=2, n_embd=64, n_head=4, n_kv_head=2, mlp_dim=128,
                    max_seq_len=64, tie_embeddings=False)


@pytest.mark.slow
@pytest.mark.parametrize("n_prompts", [2, 8], ids=["few_rows", "batched"])  # 4+ rows: the batched CPU step
def test_greedy_with_cache_equals_argmax_of_full_recomputation(n_prompts):
    params = model.init_params(SMALL, jax.random.key(0))
    params = jax.tree.map(lambda x: x * 4, params)  # sharper logits: no near-ties between candidates
    lengths = np.random.RandomState(n_prompts).randint(1, 12, n_prompts)
    prompts = [np.random.RandomState(i).randint(0, SMALL.vocab_size, n).tolist() for i, n in enumerate(lengths)]
    samples = Engine(SMALL, params).generate(prompts, SamplingParams(temperature=0, max_new_tokens=12))
    for prompt, [sample] in zip(prompts, samples):
        for token, last in zip(sample.tokens, _recomputed_logits(params, prompt, sample)):
            assert token == int(jnp.argmax(last))
        assert sample.finish_reason == "length" and len(sample.tokens) == 12


def test_a_call_s_seed_repeats_its_rollouts_exactly_and_another_seed_differs():
    params = model.init_params(SMALL, jax.random.key(0))
    engine = Engine(SMALL, params)

    def rollouts(seed):
        groups = engine.generate([[5, 17, 3], [9, 1]], SamplingParams(max_new_tokens=12, n=4, seed=seed))
        return [sample.tokens for group in groups for sample in group]

    first = rollouts(11)
    assert rollouts(11) == first
    assert rollouts(12) != first


# stacked: the accelerators' layout, run on CPU
@pytest.mark.parametrize("layout", [CPU_LAYOUT, STACKED], ids=["per_layer", "stacked"])
def test_samples_of_a_prompt_share_its_prefill_and_each_stays_exact(layout):
    params = model.init_params(SMALL, jax.random.key(0))
    prompts = [[5, 17, 3], [9, 1, 44, 60, 2, 71, 8]]  # two lengths, so a sample continuing the wrong prompt shows
    samples = Engine(SMALL, params, layout=layout).generate(prompts, SamplingParams(max_new_tokens=10, n=3, seed=3))
    for prompt, group in zip(prompts, samples):
        assert len(group) == 3 and len({s.tokens[0] for s in group}) > 1  # independent draws from the first token on
        for sample in group:
            _recomputed_logits(params, prompt, sample)  # checks every log-probability


@pytest.mark.slow
def test_the_engines_cpu_cache_holds_and_attends_as_the_models_cache():
    """64 rows of 3 tokens at scattered positions: per-row slices into per-layer [B, K, H, S] values, one scatter
    into the model's stacked [L, B, K, S, H] ones; the same slots, rows and attention either way."""
    B, T, S, layer = 64, 3, 32, 1
    cfg, _ = CPU_LAYOUT.place(SMALL, model.init_params(SMALL, jax.random.key(0)))
    ours, theirs = CPU_LAYOUT.empty_cache(cfg, B, S), model.init_cache(SMALL, B, S)
    assert isinstance(ours, LayerCache) and isinstance(theirs, model.KVCache)
    keys = jax.random.split(jax.random.key(1), 3)
    new_k, new_v = (jax.random.normal(k, (B, T, SMALL.n_kv_head, SMALL.head_dim)) for k in keys[:2])
    positions = jnp.asarray(np.random.RandomState(0).randint(0, S - T + 1, B)[:, None] + np.arange(T))
    write = jax.jit(lambda cache: cache.write(layer, new_k, new_v, positions))
    ours, theirs = write(ours), write(theirs)
    np.testing.assert_array_equal(ours.k[layer], theirs.k_LxBxKxSxH[layer])
    np.testing.assert_array_equal(ours.v[layer], theirs.v_LxBxKxSxH[layer].transpose(0, 1, 3, 2))
    rows = jnp.array([5, 5, 63, 0])
    ours, theirs = model.cache_rows(ours, rows), model.cache_rows(theirs, rows)
    q = jax.random.normal(keys[2], (len(rows), T, SMALL.n_head, SMALL.head_dim))
    mask = (jnp.arange(S)[None, None, :] <= positions[rows][:, :, None])[:, None]
    np.testing.assert_allclose(ours.attend(layer, q, mask), theirs.attend(layer, q, mask), atol=1e-6)


@pytest.mark.slow
def test_a_prompts_seen_tokens_penalise_only_its_own_samples():
    """Both prompts' model says `seen[0]` next; only the prompt containing it penalises it away, in all its samples."""
    seen, unseen = TOKENIZER.encode(" one two three"), TOKENIZER.encode(" red green blue")
    assert len(seen) == len(unseen) and seen[0] not in unseen
    cfg, params = scripted_gpt2(script(seen, [seen[0]]))
    greedy = SamplingParams(temperature=0, repetition_penalty=1e4, max_new_tokens=1, n=2)
    first_tokens = [[s.tokens[0] for s in group] for group in Engine(cfg, params).generate([seen, unseen], greedy)]
    assert seen[0] not in first_tokens[0] and first_tokens[1] == [seen[0], seen[0]]


def _recomputed_logits(params, prompt, sample, length=32):
    """Each sampled token's logits from a full SMALL forward pass over its sequence so far; checks its logprob."""
    forward = _jitted_forward(SMALL)
    sequence, all_logits = list(prompt), []
    for token, logprob in zip(sample.tokens, sample.logprobs):
        # Right-padded to one shape (one compile); causal attention ignores the padding.
        logits, _ = forward(params, jnp.array([sequence + [0] * (length - len(sequence))]))
        last = logits[0, len(sequence) - 1]
        np.testing.assert_allclose(logprob, jax.nn.log_softmax(last)[token], atol=1e-4)
        all_logits.append(last)
        sequence.append(token)
    return all_logits


@functools.cache
def _jitted_forward(cfg):
    return jax.jit(functools.partial(model.forward, cfg))


@pytest.mark.parametrize("make", [gpt2, functools.partial(llama, tie=False, rope_scaling=True)],
                         ids=["gpt2", "llama"])
@pytest.mark.slow
def test_greedy_equals_transformers_generate(make, tmp_path):
    torch_model = make()
    torch_model.save_pretrained(tmp_path, safe_serialization=True)
    cfg, params = hf.load_hf(str(tmp_path))
    prompt = [3, 14, 15, 92, 65]
    with torch.no_grad():
        expected = torch_model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=16, min_new_tokens=16,
                                        pad_token_id=0)[0, len(prompt):].tolist()
    [[sample]] = Engine(cfg, params).generate([prompt], SamplingParams(temperature=0, max_new_tokens=16))
    assert sample.tokens == expected


def test_top_k_of_one_is_greedy():
    logits = jax.random.normal(jax.random.key(0), (512, 50))
    drawn = sample_tokens(jax.random.key(1), logits, temperature=1.5, top_k=1)
    np.testing.assert_array_equal(drawn, jnp.argmax(logits, -1))


def test_engine_top_k_of_one_and_a_tiny_top_p_sample_greedily_and_never_recompile():
    params = jax.tree.map(lambda x: x * 4, model.init_params(SMALL, jax.random.key(0)))
    engine = Engine(SMALL, params)
    prompts = [[3, 1, 4], [1, 5, 9, 2, 6]]
    greedy = engine.generate(prompts, SamplingParams(temperature=0, max_new_tokens=10))
    compiled = [engine._prefill._cache_size(), engine._decode_step(len(prompts))._cache_size()]
    for controls in [dict(top_k=1, temperature=1.5), dict(top_p=1e-6, temperature=0.7), dict(top_p=1e-6, seed=5)]:
        sampled = engine.generate(prompts, SamplingParams(max_new_tokens=10, **controls))
        assert [s.tokens for [s] in sampled] == [s.tokens for [s] in greedy], controls
    # temperature, top-p and the seed are traced values: only top-k's k compiled anew (once per step function)
    assert [engine._prefill._cache_size(), engine._decode_step(len(prompts))._cache_size()] == [c + 1 for c in compiled]


def test_a_row_that_stops_early_leaves_the_others_exact():
    params = jax.tree.map(lambda x: x * 4, model.init_params(SMALL, jax.random.key(0)))
    engine = Engine(SMALL, params)
    prompts = [[3, 1, 4], [1, 5, 9, 2, 6], [7, 7]]
    free = [s.tokens for [s] in engine.generate(prompts, SamplingParams(temperature=0, max_new_tokens=12))]
    stop = next(t for t in free[0][1:] if t not in free[0][:1] and any(t not in row for row in free[1:]))
    stopped = engine.generate(prompts, SamplingParams(temperature=0, max_new_tokens=12, stop_token_ids=(stop,)))
    for row, [sample] in zip(free, stopped):
        expected = row[: row.index(stop) + 1] if stop in row else row
        assert sample.tokens == expected
        assert sample.finish_reason == ("stop" if stop in row else "length")


@pytest.mark.parametrize("vocab", [50_304, 50_000, 130])  # whole blocks, a padded last block, fewer blocks than k
def test_top_k_by_blocks_is_exact(vocab):
    logits = jax.random.normal(jax.random.key(vocab), (8, vocab)) * 3
    coarse = jnp.round(logits)  # many ties, across blocks too
    for x in (logits, coarse):
        values, ids = top_k_by_blocks(x, 50)
        expected_values, expected_ids = jax.lax.top_k(x, 50)
        np.testing.assert_array_equal(values, expected_values)
        np.testing.assert_array_equal(jnp.take_along_axis(x, ids, axis=1), values)  # ids point at their values
        assert all(len(set(row)) == 50 for row in np.asarray(ids).tolist())  # no token twice
        values = np.asarray(values)  # untied values keep the same token as lax.top_k
        untied = (values != np.roll(values, 1, axis=1)) & (values != np.roll(values, -1, axis=1))
        np.testing.assert_array_equal(np.asarray(ids)[untied], np.asarray(expected_ids)[untied])


def test_top_p_keeps_exactly_the_smallest_set_reaching_p():
    logits = jax.random.normal(jax.random.key(2), (1, 40)) * 2
    probs = np.asarray(jax.nn.softmax(logits[0]))
    order = np.argsort(-probs)
    for top_p in [0.05, 0.3, 0.5, 0.9, 0.999]:
        kept = np.flatnonzero(np.isfinite(np.asarray(process_logits(logits, top_p=top_p))[0]))
        n = int(np.searchsorted(np.cumsum(probs[order]), top_p) + 1)  # smallest prefix whose mass >= p
        assert sorted(kept) == sorted(order[:n]), top_p


def test_controls_match_transformers_logits_processors():
    torch.manual_seed(0)
    scores = torch.randn(4, 100) * 3
    input_ids = torch.randint(0, 100, (4, 12))
    processors = transformers.LogitsProcessorList([
        transformers.RepetitionPenaltyLogitsProcessor(1.3), transformers.TemperatureLogitsWarper(0.7),
        transformers.TopKLogitsWarper(20), transformers.TopPLogitsWarper(0.8),
    ])
    expected = processors(input_ids, scores.clone()).numpy()
    seen = np.zeros((4, 100), bool)
    np.put_along_axis(seen, input_ids.numpy(), True, axis=1)
    ours = np.asarray(process_logits(jnp.asarray(scores.numpy()), temperature=0.7, top_k=20, top_p=0.8,
                                     repetition_penalty=1.3, seen_BxV=seen))
    np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(expected))
    np.testing.assert_allclose(ours[np.isfinite(ours)], expected[np.isfinite(expected)], rtol=1e-6)


def test_temperature_sampling_frequencies_follow_softmax_of_scaled_logits():
    logits = jnp.array([2.0, 1.0, 0.5, 0.0, -1.0])
    n = 40_000
    drawn = sample_tokens(jax.random.key(3), jnp.broadcast_to(logits, (n, 5)), temperature=0.5)
    freq = np.bincount(np.asarray(drawn), minlength=5) / n
    expected = np.asarray(jax.nn.softmax(logits / 0.5))
    tolerance = 4 * np.sqrt(expected * (1 - expected) / n)  # four standard errors per token
    assert np.all(np.abs(freq - expected) < tolerance), (freq, expected)


def test_prompt_longer_than_context_is_a_clear_error():
    params = model.init_params(SMALL, jax.random.key(0))
    with pytest.raises(ValueError, match="prompt 1 has 64 tokens but the model's context is 64"):
        Engine(SMALL, params).generate([[1, 2], [3] * 64], SamplingParams(max_new_tokens=4))


@pytest.mark.parametrize("controls, message", [
    (dict(max_new_tokens=0), "max_new_tokens and n must be >= 1"), (dict(n=0), "max_new_tokens and n must be >= 1"),
    (dict(top_p=0.0), "invalid sampling controls"), (dict(temperature=-1.0), "invalid sampling controls"),
    (dict(stop_strings=("",)), "an empty stop string"),
])
def test_bad_sampling_controls_are_clear_errors(controls, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**controls)


def test_token_ids_outside_the_vocabulary_are_a_clear_error():
    params = model.init_params(SMALL, jax.random.key(0))
    with pytest.raises(ValueError, match="prompt 1 has token id 96, outside the model's vocabulary of 96 ids"):
        Engine(SMALL, params).generate([[1, 2], [3, 96]], SamplingParams(max_new_tokens=4))
    with pytest.raises(ValueError, match="tool 'python' needs token ids .* but the model has 96 logits"):
        Engine(SMALL, params, TOKENIZER, tools={"python": Calculator()})


def test_engine_for_gives_the_calculator_only_when_asked_and_the_tokenizer_has_its_tokens():
    cfg, params = scripted_gpt2({})
    assert isinstance(engine_for(cfg, params, TOKENIZER, tools=True).tools["python"], Calculator)
    assert engine_for(cfg, params, TOKENIZER, tools=False).tools == {}
    no_tool_tokens = types.SimpleNamespace(has_tool=lambda tool: False)
    assert engine_for(cfg, params, no_tool_tokens, tools=True).tools == {}


def test_generation_stops_at_the_context_with_its_reason():
    params = model.init_params(SMALL, jax.random.key(0))
    [[sample]] = Engine(SMALL, params).generate([[1] * 60], SamplingParams(max_new_tokens=50))
    assert sample.finish_reason == "context" and len(sample.tokens) == 4


def test_n_samples_per_prompt_differ_and_are_reproducible():
    params = model.init_params(SMALL, jax.random.key(0))
    engine = Engine(SMALL, params)
    sampling = SamplingParams(max_new_tokens=8, n=4, seed=7)
    first = engine.generate([[1, 2, 3], [4, 5]], sampling)
    assert [len(s) for s in first] == [4, 4]
    assert len({tuple(s.tokens) for s in first[0]}) > 1
    again = engine.generate([[1, 2, 3], [4, 5]], sampling)
    assert [[s.tokens for s in p] for p in again] == [[s.tokens for s in p] for p in first]


# "lo wo" spans the two tokens; "Hello " ends on the first byte of " world" (the earliest start the search reads).
@pytest.mark.parametrize("stop, text", [("lo wo", " Hel"), ("Hello ", " ")])
def test_stop_string_split_across_tokens_stops_at_the_right_character(stop, text):
    prompt = TOKENIZER.encode("Say:")
    words = TOKENIZER.encode(" Hello world, again and again")
    assert TOKENIZER.decode(words[:2]) == " Hello world"
    cfg, params = scripted_gpt2(script(prompt, words))
    [samples] = Engine(cfg, params, TOKENIZER).generate(
        [prompt], SamplingParams(temperature=0, max_new_tokens=10, stop_strings=("again", stop), n=2))
    for sample in samples:
        assert sample.text == text and sample.finish_reason == "stop"
        assert sample.tokens == words[:2]


@pytest.mark.parametrize("expression, result", [("2+3*4", "14"), ("__import__('os')", None)])
def test_scripted_tool_call_gets_the_result_injected(expression, result):
    calculator = Calculator()
    output = calculator(expression)
    assert (output == result) if result else output.startswith("Error: Call is not allowed")
    # The model emits the call, the engine writes the output (the model's own guesses there
    # are ignored), then the model answers.
    answer = [*TOKENIZER.encode(" Done."), TOKENIZER.eot]
    cfg, params, prompt, call_and_output = _scripted_call(expression, output, answer)
    streamed = []
    [[sample]] = Engine(cfg, params, TOKENIZER, tools={"python": calculator}).generate(
        [prompt], SamplingParams(temperature=0, max_new_tokens=40, stop_token_ids=(TOKENIZER.eot,)),
        on_token=lambda prompt_index, sample_index, token: streamed.append((prompt_index, sample_index, token)))
    assert sample.tokens == call_and_output + answer
    assert streamed == [(0, 0, token) for token in sample.tokens]  # in order, forced tokens included
    call_length = len(TOKENIZER.encode(expression)) + 2
    assert sample.forced == [False] * call_length + [True] * (len(call_and_output) - call_length) + [False] * len(answer)
    assert sample.finish_reason == "stop"
    assert sample.text == TOKENIZER.decode(call_and_output) + " Done."  # the stop token is not text


def _scripted_call(expression: str, output: str, answer: list[int]):
    """A scripted model that calls the python tool on `expression`, expects `output` back, then says `answer`.

    Returns (cfg, params, prompt, the call and output tokens).
    """
    call_start, call_end, out_start, out_end = (TOKENIZER.token_id(t) for t in tool_tokens("python"))
    prompt = TOKENIZER.encode("Q: what is it? A:")
    call = [call_start, *TOKENIZER.encode(expression), call_end]
    forced = [out_start, *TOKENIZER.encode(output), out_end]
    cfg, params = scripted_gpt2(script(prompt, call + [None] * len(forced) + answer))
    return cfg, params, prompt, call + forced


def test_stop_strings_match_what_the_model_wrote_not_a_tools_output():
    cfg, params, prompt, call_and_output = _scripted_call("6*7", "STOP here", TOKENIZER.encode(" fine. STOP now"))
    engine = Engine(cfg, params, TOKENIZER, tools={"python": lambda expression: "STOP here"})
    [[sample]] = engine.generate([prompt], SamplingParams(temperature=0, max_new_tokens=40, stop_strings=("STOP",)))
    assert sample.tokens[: len(call_and_output)] == call_and_output and sample.finish_reason == "stop"
    assert sample.text == TOKENIZER.decode(call_and_output) + " fine. "


def test_a_tool_that_raises_answers_with_its_error():
    def broken(expression):
        raise RuntimeError("index is down")

    cfg, params, prompt, call_and_output = _scripted_call("6*7", "Error: RuntimeError: index is down", TOKENIZER.encode(" Sorry."))
    [[sample]] = Engine(cfg, params, TOKENIZER, tools={"python": broken}).generate(
        [prompt], SamplingParams(temperature=0, max_new_tokens=len(call_and_output) + 2))
    assert sample.tokens[: len(call_and_output)] == call_and_output
    assert TOKENIZER.decode(sample.tokens).endswith("Error: RuntimeError: index is down<|python_output_end|> Sorry.")


@pytest.mark.slow
def test_tool_calls_in_a_batch_keep_every_row_exact():
    """Rows call a tool at different points of their samples while another row samples on; with a
    repetition penalty, every sampled token is the argmax of a full recomputation of its row so far
    (forced outputs included), so overridden inputs, the cache and the seen-token mask all stay exact."""
    call_start, call_end = TOKENIZER.token_id(tool_tokens("python")[0]), TOKENIZER.token_id(tool_tokens("python")[1])
    call = [call_start, *TOKENIZER.encode("6*7"), call_end]
    # Scripted at absolute positions 12..16; strong random blocks make every other token depend on the context.
    cfg, params = scripted_gpt2({12 + i: t for i, t in enumerate(call)}, strength=40.0)
    blocks = model.init_params(cfg, jax.random.key(3))["blocks"]
    params = {**params, "blocks": jax.tree.map(lambda b: 4 * b, blocks)}
    prompts = [TOKENIZER.encode("one two three four five"), TOKENIZER.encode("a b c d e f g h i"), list(range(100, 120))]
    sampling = SamplingParams(temperature=0, repetition_penalty=1.3, max_new_tokens=24)
    samples = Engine(cfg, params, TOKENIZER, tools={"python": Calculator()}).generate(prompts, sampling)
    forward = jax.jit(functools.partial(model.forward, cfg))
    assert [sum(s.forced) for [s] in samples] == [3, 3, 0]  # output start, "42", output end
    for prompt, [sample] in zip(prompts, samples):
        sequence = list(prompt)
        for token, logprob, forced in zip(sample.tokens, sample.logprobs, sample.forced):
            if not forced:
                logits, _ = forward(params, jnp.array([sequence + [0] * (cfg.max_seq_len - len(sequence))]))
                last_1xV = logits[:, len(sequence) - 1]
                seen_1xV = jnp.zeros_like(last_1xV, bool).at[0, jnp.array(sequence)].set(True)
                assert token == int(jnp.argmax(process_logits(last_1xV, repetition_penalty=1.3, seen_BxV=seen_1xV)))
                np.testing.assert_allclose(logprob, jax.nn.log_softmax(last_1xV[0])[token], atol=1e-4)
            sequence.append(token)
        assert len(sample.tokens) == 24


@pytest.mark.parametrize("expression", [
    "__import__('os').system('true')", "(1).__class__", "x + 1", "2 ** 10000", "9 ** 9 ** 9",
    "[i for i in range(10**9)]", "sum(range(10**12))", "1" * 300, "lambda: 0", "(" * 200 + "1" + ")" * 200,
])
def test_calculator_refuses_everything_but_bounded_arithmetic(expression):
    assert Calculator()(expression).startswith("Error: ")


def test_calculator_arithmetic():
    calc = Calculator()
    assert [calc(e) for e in ["1,234 + 6", "7 / 2", "2 ** 10", "-(3 - 5) * 4", "10 // 3", "10 % 4", "1/0"]] == [
        "1240", "3.5", "1024", "8", "3", "2", "Error: division by zero"]
    # A tiny base under a negative exponent is as big as a huge one under a positive exponent.
    assert [calc("0.5 ** -10"), calc("1e-99 ** -64")] == ["1024", "Error: result would exceed 1e+100"]


def test_search_tool_finds_the_relevant_document():
    search = Search(["The Eiffel Tower is in Paris.", "Mount Fuji is the highest mountain in Japan.",
                     "JAX transforms numerical functions."], top_k=1)
    assert search("highest mountain Japan") == "Mount Fuji is the highest mountain in Japan."
    assert search("zzzz qqqq") == "No results."
