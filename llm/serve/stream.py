"""A sample's text as it streams: deltas that never split a UTF-8 character nor show a stop string.

The terminal's `launch.sampling_flags.Printer` writes these same deltas to stdout. Text
that may begin a stop string and a trailing partial character are held back, so the
deltas joined equal the final text exactly.
Tool control tokens show as fenced blocks (how chat UIs show code-interpreter calls),
never as raw `<|python_start|>`-style tokens.
"""

from __future__ import annotations

from typing import Sequence

from llm.chat_format import tool_tokens


def tool_display(tokenizer, tools: Sequence[str]) -> dict[int, str]:
    """Readable text for each tool's call and output tokens: a ```python call block, then an ```output block."""
    shown = {}
    for name in tools:
        call_start, call_end, out_start, out_end = (tokenizer.token_id(t) for t in tool_tokens(name))
        shown |= {call_start: f"\n```{name}\n", call_end: "\n```\n", out_start: "```output\n", out_end: "\n```\n"}
    return shown


def render(tokenizer, tokens: Sequence[int], hide: frozenset[int] = frozenset(), shown: dict[int, str] | None = None
           ) -> str:
    """The text of `tokens`: hidden ids dropped, displayed ids replaced, bytes decoded together."""
    data = b"".join(_token_bytes(tokenizer, t, hide, shown or {}) for t in tokens)
    return data.decode("utf-8", errors="replace")


def _token_bytes(tokenizer, token: int, hide: frozenset[int], shown: dict[int, str]) -> bytes:
    if token in hide:
        return b""
    return shown[token].encode() if token in shown else tokenizer.decode_bytes([token])


def final_text(tokenizer, tokens: Sequence[int], stop_strings: Sequence[str], hide: frozenset[int] = frozenset(),
               shown: dict[int, str] | None = None) -> str:
    """A finished sample's text: cut before its first stop string, as the engine cuts `Sample.text`."""
    text = render(tokenizer, tokens, hide, shown)
    cuts = [text.find(stop) for stop in stop_strings if stop in text]
    return text[: min(cuts)] if cuts else text


class TextDeltas:
    """Turns one sample's tokens into text deltas; `finish(final)` gives the rest of `final`."""

    def __init__(self, tokenizer, stop_strings: Sequence[str] = (), hide: frozenset[int] = frozenset(),
                 shown: dict[int, str] | None = None):
        self.tokenizer, self.stop_strings, self.hide, self.shown_ids = tokenizer, tuple(stop_strings), hide, shown
        self.hold = max(map(len, self.stop_strings), default=1) - 1  # characters that may begin a stop string
        self.data = bytearray()
        self.sent = ""

    def push(self, token: int) -> str:
        self.data += _token_bytes(self.tokenizer, token, self.hide, self.shown_ids or {})
        text = self.data.decode("utf-8", errors="replace")
        if text.endswith("\ufffd"):  # the rest of a multi-byte character is still to come
            return ""
        cuts = [text.find(stop) for stop in self.stop_strings if stop in text]
        text = text[: min(cuts)] if cuts else text[: len(text) - self.hold]
        return self._advance(text)

    def finish(self, final: str) -> str:
        return self._advance(final)

    def _advance(self, text: str) -> str:
        if len(text) <= len(self.sent) or not text.startswith(self.sent):
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta
