"""The chat format: a format as data (`ChatTemplate`), and conversations rendered as token ids and a loss mask.

Our format (`OUR_CHAT`): each message is `<|im_start|>{role}<|im_sep|>{content}<|im_end|>`.
An assistant message may end in a tool call, `<|python_start|>2**10<|python_end|>`;
its turn then stays open, the next (`tool`) message renders inline as
`<|python_output_start|>1024<|python_output_end|>`, and the following assistant
message continues the same turn up to its `<|im_end|>`. This is the token stream
a sampler sees when it runs the tool and forces the output tokens itself. A real
model's tokenizer (`llm/hf_tokenizer.py`) brings its own format, read off its Jinja
template (`llm/chat_jinja.py`: ChatML, Llama 3's headers, Zephyr's, Mistral's
`[INST]`, Phi-3's, Gemma's), and renders, masks and stops the same way, without
tools unless it has the tool tokens.

Special tokens spelled in a template become their ids; content, from users,
documents or tools, is always encoded as ordinary text, so it cannot forge one.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import tiktoken


class Tokenizer(Protocol):
    """What rendering needs of `llm.tokenizer.Tokenizer` (which imports this module, so it is not imported here)."""

    name: str
    encoding: tiktoken.Encoding
    chat_template: ChatTemplate | None

    def encode(self, text: str) -> list[int]: ...

    def token_id(self, special_token: str) -> int: ...

    def split_special(self, template_text: str) -> list[str]: ...

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
IM_SEP = "<|im_sep|>"
TOOLS = ("search", "python")
ROLES = ("system", "user", "assistant", "tool")

Segment = tuple[str | int, bool]  # text or a special token's id, and whether it is trained


def tool_tokens(tool: str) -> tuple[str, str, str, str]:
    """The call pair and the output pair of one tool: (call start, call end, output start, output end)."""
    return (f"<|{tool}_start|>", f"<|{tool}_end|>", f"<|{tool}_output_start|>", f"<|{tool}_output_end|>")


class ChatTemplateError(ValueError):
    """A model's Jinja chat template that does not fit `ChatTemplate`; the message names the template and what did not fit."""


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    """A chat format as data: each message renders as its role's header, its content, then its role's footer.

    `header` spells `{role}` for the role's name; `headers` (role -> header), when
    given, replaces it and names the only roles the format has (Gemma's has no
    system turn, its assistant is `model`). `footer` closes an assistant turn and
    begins with the end-of-turn token, which a sampler stops at and which is
    trained on with the assistant's content; `footers` gives other roles their own
    (Mistral's user turn ends in ` [/INST]`). `begin` and `default_system` (the
    system message a model's own template inserts when none is given) open a
    conversation, `end` closes one that is not waiting for the assistant (Phi-3
    small's end-of-text). Special tokens are spelled inline (`<|im_start|>`) and
    become their ids; content is always encoded as ordinary text.
    """

    name: str
    header: str
    footer: str
    begin: str = ""
    default_system: str | None = None
    headers: dict[str, str] | None = None
    footers: dict[str, str] | None = None
    end: str = ""

    def role_header(self, role: str) -> str:
        if self.headers is None:
            return self.header.replace("{role}", role)
        if role not in self.headers:
            raise ValueError(f"chat template {self.name!r} has no {role} turn (its roles: {sorted(self.headers)})")
        return self.headers[role]

    def role_footer(self, role: str) -> str:
        return (self.footers or {}).get(role, self.footer)

    def to_jinja(self) -> str:
        """The same format as a Hugging Face / llama.cpp Jinja chat template."""
        system = ""
        if self.default_system is not None:
            opening = _literal(self.role_header("system") + self.default_system + self.role_footer("system"))
            system = f"{{% if messages[0]['role'] != 'system' %}}{{{{ {opening} }}}}{{% endif %}}"
        if self.headers is None and self.footers is None and not self.end:  # one rule for every role
            pre, post = (_literal(part) for part in self.header.split("{role}"))
            return (
                f"{{{{ {_literal(self.begin)} }}}}{system}{{% for message in messages %}}"
                f"{{{{ {pre} + message['role'] + {post} + message['content'] + {_literal(self.footer)} }}}}{{% endfor %}}"
                f"{{% if add_generation_prompt %}}{{{{ {pre} + 'assistant' + {post} }}}}{{% endif %}}"
            )
        roles = list(self.headers) if self.headers is not None else ["system", "user", "assistant"]
        turns = "".join(
            f"{{% {'if' if i == 0 else 'elif'} message['role'] == {_literal(role)} %}}"
            f"{{{{ {_literal(self.role_header(role))} + message['content'] + {_literal(self.role_footer(role))} }}}}"
            for i, role in enumerate(roles))
        refuse = f"{{{{ raise_exception('roles: ' + {_literal(', '.join(roles))}) }}}}"
        return (f"{{{{ {_literal(self.begin)} }}}}{system}{{% for message in messages %}}{turns}"
                f"{{% else %}}{refuse}{{% endif %}}{{% endfor %}}{{% if add_generation_prompt %}}"
                f"{{{{ {_literal(self.role_header('assistant'))} }}}}{{% else %}}{{{{ {_literal(self.end)} }}}}{{% endif %}}")



def _literal(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


# The project's own format (see the module docstring).
OUR_CHAT = ChatTemplate("llm", f"{IM_START}{{role}}{IM_SEP}", IM_END)


# ----------------------------------------------------------------------------- rendering


def render_conversation(tok: Tokenizer, messages: Sequence[Mapping[str, Any]], *, start: bool = True
                        ) -> tuple[list[int], list[int]]:
    """Token ids of a conversation and a loss mask, 1 exactly on assistant content and its end-of-turn token.

    A message is `{"role": "system" | "user" | "assistant" | "tool", "content": str}`.
    Assistant content may also be a list of parts `{"type": "text" | tool, "text": str}`
    whose last part may be a call of a tool in TOOLS; the next message is then
    `{"role": "tool", "content": output}` (optionally with `"name": tool`) and the
    assistant message after it continues the same turn. Tool outputs are not
    trained on: the sampler writes them, not the model. The chat format is the
    tokenizer's `chat_template`; `start=False` renders a continuation (no
    `begin`, no default system message).
    """
    ids, mask, state = _render(tok, messages, start)
    if state != _CLOSED:
        raise ValueError(
            "the conversation ends inside an assistant turn: a tool call or output awaits the assistant's answer"
        )
    return ids, mask


def render_for_completion(tok: Tokenizer, messages: Sequence[Mapping[str, Any]], *, start: bool = True) -> list[int]:
    """Token ids that prompt for the next assistant message: the conversation and an open assistant turn."""
    ids, _, state = _render(tok, messages, start, open_assistant=True)
    if state not in (_CLOSED, _OPEN):
        raise ValueError(f"the last message calls {state} but no tool message gives its output")
    return ids


def end_of_turn(tok: Tokenizer) -> int:
    """The token that ends a chat turn, where a sampler stops: the first of the footer."""
    return tok.token_id(tok.split_special(require_template(tok).footer)[0])


def turn_end_ids(tok: Tokenizer) -> list[int]:
    """The ids that close a turn: the end-of-turn token and whatever the format puts after it."""
    ids, _ = encode_segments(tok, _template_segments(tok, require_template(tok).footer, trained=False))
    return ids


def require_template(tok: Tokenizer) -> ChatTemplate:
    if tok.chat_template is None:
        raise ValueError(f"tokenizer {tok.name} has no chat format this project can render (its model brought none)")
    return tok.chat_template


def _template_segments(tok: Tokenizer, text: str, trained: bool, role: str = "") -> list[Segment]:
    """Segments of trusted template text: special tokens as ids, the rest (role names included) as text."""
    special = tok.encoding.special_tokens_set
    return [(tok.token_id(piece) if piece in special else piece, trained)
            for piece in tok.split_special(text.replace("{role}", role))]


def _tool_id(tok: Tokenizer, token: str) -> int:
    if token not in tok.encoding.special_tokens_set:
        raise ValueError(f"tokenizer {tok.name} has no tool tokens ({token!r}): this model cannot call tools")
    return tok.token_id(token)


_CLOSED, _OPEN = "<closed>", "<open>"  # rendering states besides "a call of this tool awaits its output"


def _render(tok: Tokenizer, messages: Sequence[Mapping[str, Any]], start: bool, open_assistant: bool = False
            ) -> tuple[list[int], list[int], str]:
    """Ids, mask and the final state: _CLOSED, _OPEN (turn continues after a tool output) or the tool awaiting output."""
    template = require_template(tok)
    segments: list[Segment] = []

    def header(role: str) -> None:
        segments.extend(_template_segments(tok, template.role_header(role), False, role))

    def footer(role: str, trained: bool) -> None:
        if role != "assistant":
            segments.extend(_template_segments(tok, template.role_footer(role), False))
            return
        end, *rest = _template_segments(tok, template.footer, False)
        segments.extend([(end[0], trained), *rest])

    if start:
        segments.extend(_template_segments(tok, template.begin, False))
        if template.default_system is not None and (not messages or messages[0].get("role") != "system"):
            header("system")
            segments.append((template.default_system, False))
            footer("system", False)
    state = _CLOSED
    for i, message in enumerate(messages):
        role, parts = _parse_message(message, i)
        if role == "tool":
            if state in (_CLOSED, _OPEN):
                raise ValueError(
                    f"message {i}: a tool message must follow an assistant message that ends in a tool call"
                )
            if message.get("name", state) != state:
                raise ValueError(f"message {i}: output of tool {message['name']!r}, but the call was to {state!r}")
            _, _, out_start, out_end = tool_tokens(state)
            segments.extend([(_tool_id(tok, out_start), False), (parts[0][1], False), (_tool_id(tok, out_end), False)])
            state = _OPEN
            continue
        if state not in (_CLOSED, _OPEN):
            raise ValueError(f"message {i}: the {state} call before it needs a tool message with its output")
        if state == _OPEN and role != "assistant":
            raise ValueError(
                f"message {i}: after a tool output the assistant continues its turn, got a {role} message"
            )
        if state == _CLOSED:
            header(role)
        trained = role == "assistant"
        for kind, text in parts:
            if kind == "text":
                segments.append((text, trained))
            else:
                call_start, call_end, _, _ = tool_tokens(kind)
                segments.extend([(_tool_id(tok, call_start), trained), (text, trained),
                                 (_tool_id(tok, call_end), trained)])
        last_kind = parts[-1][0] if parts else "text"
        if last_kind == "text":
            footer(role, trained)
            state = _CLOSED
        else:
            state = last_kind  # the turn stays open for the tool's output
    if open_assistant and state == _CLOSED:
        header("assistant")
    elif not open_assistant:
        segments.extend(_template_segments(tok, template.end, False))
    ids, mask = encode_segments(tok, segments)
    return ids, mask, state


def encode_segments(tok: Tokenizer, segments: Sequence[Segment]) -> tuple[list[int], list[int]]:
    """Ids and mask of segments; adjacent text is encoded as one string, as the model's own template renders it.

    A token made of trained and untrained text (a header's newline merged with
    content) counts as trained.
    """
    ids: list[int] = []
    mask: list[int] = []
    run: list[tuple[str, bool]] = []

    def flush() -> None:
        if not run:
            return
        text = "".join(t for t, _ in run)
        tokens = tok.encode(text)
        ids.extend(tokens)
        if len({trained for _, trained in run}) == 1:
            mask.extend([int(run[0][1])] * len(tokens))
        else:  # per token: does its byte span overlap a trained segment's?
            trained_bytes = []
            for t, trained in run:
                trained_bytes += [trained] * len(t.encode("utf-8", errors="surrogatepass"))
            offset = 0
            for token in tokens:
                width = len(tok.encoding.decode_single_token_bytes(token))
                mask.append(int(any(trained_bytes[offset:offset + width])))
                offset += width
        run.clear()

    for piece, trained in segments:
        if isinstance(piece, str):
            if piece:
                run.append((piece, trained))
        else:
            flush()
            ids.append(piece)
            mask.append(int(trained))
    flush()
    return ids, mask


def _parse_message(message: Mapping[str, Any], i: int) -> tuple[str, list[tuple[str, str]]]:
    """The role and the (kind, text) parts of a message; kind is "text" or the tool called."""
    role, content = message.get("role"), message.get("content")
    if role not in ROLES:
        raise ValueError(f"message {i}: unknown role {role!r}, expected one of {ROLES}")
    if isinstance(content, str):
        return role, [("text", content)]
    if role != "assistant" or not isinstance(content, list):
        raise TypeError(
            f"message {i}: {role} content must be a string" + (" or a list of parts" if role == "assistant" else "")
        )
    parts = []
    for part in content:
        kind, text = part.get("type"), part.get("text")
        if kind not in ("text", *TOOLS) or not isinstance(text, str):
            raise ValueError(
                f"message {i}: bad part {part!r}, expected {{'type': one of {('text', *TOOLS)}, 'text': str}}"
            )
        parts.append((kind, text))
    if any(kind != "text" for kind, _ in parts[:-1]):
        raise ValueError(f"message {i}: a tool call must be the last part; its output comes in the next (tool) message")
    return role, parts
