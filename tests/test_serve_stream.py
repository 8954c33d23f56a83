"""`llm.serve.stream`: streamed deltas never split a UTF-8 character nor show any of a stop string."""

from llm.serve.stream import TextDeltas, final_text
from scripted import TOKENIZER

E_ACUTE = [TOKENIZER.encoding.encode_single_token(bytes([b])) for b in "é".encode()]


def test_deltas_wait_for_whole_characters_before_judging_a_stop_string():
    """"é" arrives as two byte tokens; "xa" must wait for it, since "aé" stops the sample at "x"."""
    tokens = [*TOKENIZER.encode("xa"), *E_ACUTE]
    deltas = TextDeltas(TOKENIZER, stop_strings=("aé",))
    sent = [deltas.push(t) for t in tokens]
    final = final_text(TOKENIZER, tokens, ("aé",))
    assert final == "x" and "".join(sent) + deltas.finish(final) == "x" and not any("\ufffd" in d for d in sent)


def test_deltas_join_to_the_final_text_and_hide_stop_tokens():
    tokens = [*TOKENIZER.encode("caf"), *E_ACUTE, *TOKENIZER.encode(" au lait"), TOKENIZER.eot]
    hide = frozenset({TOKENIZER.eot})
    deltas = TextDeltas(TOKENIZER, hide=hide)
    sent = [deltas.push(t) for t in tokens]
    assert sent[len(TOKENIZER.encode("caf"))] == ""  # the first byte of "é" alone is not text yet
    final = final_text(TOKENIZER, tokens, (), hide)
    assert final == "café au lait" and "".join(sent) + deltas.finish(final) == final
