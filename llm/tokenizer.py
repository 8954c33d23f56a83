"""Tokenizer: tiktoken encodings with our control tokens, BPE training, chat rendering.

Everything a model reads goes through `Tokenizer`, a thin wrapper over a
`tiktoken.Encoding`:

* Named encodings (`gpt2`, `cl100k_base`, `o200k_base`) load from the rank files
  vendored in `llm/assets/tiktoken/` (byte-identical to OpenAI's, hash-checked),
  from a local `.tiktoken` file, or through tiktoken and its cache
  (`TIKTOKEN_CACHE_DIR`) when the vendored copy is absent.
* Our own BPE is trained with `rustbpe` and saved as a tiktoken rank file plus a
  JSON sidecar (name, split pattern, special tokens), so loading it needs
  tiktoken only.
* Control tokens (`<|endoftext|>`, the chat tokens, tool-call pairs) are special
  tokens. All text, from users, documents or tools, goes through
  `encode_ordinary`, so text that spells a control token never becomes one.

Chat format: each message is `<|im_start|>{role}<|im_sep|>{content}<|im_end|>`.
An assistant message may end in a tool call, `<|python_start|>2**10<|python_end|>`;
its turn then stays open, the next (`tool`) message renders inline as
`<|python_output_start|>1024<|python_output_end|>`, and the following assistant
message continues the same turn up to its `<|im_end|>`. This is the token stream
a sampler sees when it runs the tool and forces the output tokens itself. That
format is data (`ChatTemplate`, `OUR_CHAT`): a real model's tokenizer
(`llm/hf_tokenizer.py`) brings its own, such as ChatML or Llama 3's headers, and
renders, masks and stops the same way, without tools unless it has the tool tokens.
"""

from __future__ import annotations

import base64
import concurrent.futures
import dataclasses
import gzip
import hashlib
import itertools
import json
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import tiktoken
from tqdm.auto import tqdm

ASSETS_DIR = Path(__file__).parent / "assets" / "tiktoken"

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
IM_SEP = "<|im_sep|>"
TOOLS = ("search", "python")
ROLES = ("system", "user", "assistant", "tool")


def tool_tokens(tool: str) -> tuple[str, str, str, str]:
    """The call pair and the output pair of one tool: (call start, call end, output start, output end)."""
    return (f"<|{tool}_start|>", f"<|{tool}_end|>", f"<|{tool}_output_start|>", f"<|{tool}_output_end|>")


# Append-only: new tokens take the next free id, so adding one never moves another
# and tokenizers saved earlier keep their ids.
SPECIAL_TOKENS: tuple[str, ...] = (
    ENDOFTEXT,
    IM_START,
    IM_END,
    IM_SEP,
    *(token for tool in TOOLS for token in tool_tokens(tool)),
)

# GPT-4's split pattern (cl100k_base), the default of our BPE.
GPT4_SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
# GPT-2's, as tiktoken writes it (equivalent to the original release's, faster).
GPT2_SPLIT_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
O200K_SPLIT_PATTERN = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)


@dataclasses.dataclass(frozen=True)
class _Named:
    """One of OpenAI's encodings, as tiktoken_ext/openai_public.py defines it."""

    tiktoken_name: str  # also the stem of its rank file; `gpt2` has r50k_base's ranks
    sha256: str  # the hash tiktoken itself expects of the rank file
    pattern: str
    special_tokens: Mapping[str, int]
    chat_ids: Mapping[str, int] = dataclasses.field(default_factory=dict)  # fixed by the encoding's own chat format


NAMED_ENCODINGS: Mapping[str, _Named] = {
    "gpt2": _Named(
        "r50k_base",
        "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930",
        GPT2_SPLIT_PATTERN,
        {ENDOFTEXT: 50256},
    ),
    "cl100k_base": _Named(
        "cl100k_base",
        "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
        GPT4_SPLIT_PATTERN,
        {
            ENDOFTEXT: 100257,
            "<|fim_prefix|>": 100258,
            "<|fim_middle|>": 100259,
            "<|fim_suffix|>": 100260,
            "<|endofprompt|>": 100276,
        },
    ),
    "o200k_base": _Named(
        "o200k_base",
        "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
        O200K_SPLIT_PATTERN,
        {ENDOFTEXT: 199999, "<|endofprompt|>": 200018},
        {IM_START: 200264, IM_END: 200265, IM_SEP: 200266},  # GPT-4o's chat ids
    ),
}


# ----------------------------------------------------------------------------- rank files


def load_rank_file(path: str | os.PathLike, expected_sha256: str | None = None) -> dict[bytes, int]:
    """Mergeable ranks from a tiktoken rank file (`base64(token) rank` per line)."""
    # Not tiktoken.load.load_tiktoken_bpe: it copies local files into its cache keyed by
    # path, and would then serve a stale copy after a retrained tokenizer is saved there.
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no tiktoken rank file at {path}")
    data = path.read_bytes()
    if expected_sha256 is not None and hashlib.sha256(data).hexdigest() != expected_sha256:
        raise ValueError(f"{path} is corrupt or not the expected rank file: its sha256 is not {expected_sha256}")
    ranks = {}
    for number, line in enumerate(data.splitlines(), 1):
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError as e:
            raise ValueError(f"{path}:{number}: not a tiktoken rank line: {line[:80]!r}") from e
    return ranks


def save_rank_file(ranks: Mapping[bytes, int], path: str | os.PathLike) -> None:
    """Writes ranks in tiktoken's rank-file format, ordered by rank."""
    lines = (
        base64.b64encode(token) + b" " + str(rank).encode() for token, rank in sorted(ranks.items(), key=lambda x: x[1])
    )
    Path(path).write_bytes(b"".join(line + b"\n" for line in lines))


def control_token_ids(name: str, ranks: Mapping[bytes, int], special_tokens: Mapping[str, int]) -> dict[str, int]:
    """All special tokens: existing ids kept, o200k's chat ids fixed, the rest following the ranks in table order."""
    ids = dict(special_tokens)
    fixed = NAMED_ENCODINGS[name].chat_ids if name in NAMED_ENCODINGS else {}
    next_id = max([max(ranks.values()), *ids.values()]) + 1
    for token in SPECIAL_TOKENS:
        if token not in ids:
            ids[token] = fixed.get(token, next_id)
            next_id = max(next_id, ids[token] + 1)
    if len(set(ids.values())) != len(ids) or set(ids.values()) & set(ranks.values()):
        raise ValueError(f"special token ids collide with each other or with the ranks of {name}: {ids}")
    return ids


def _encoding(name: str, pattern: str, ranks: dict[bytes, int], special_tokens: Mapping[str, int]) -> tiktoken.Encoding:
    """A tiktoken Encoding that carries every control token of SPECIAL_TOKENS."""
    return tiktoken.Encoding(
        name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=control_token_ids(name, ranks, special_tokens)
    )


def _named_encoding(name: str, rank_file: Path | None = None) -> tiktoken.Encoding:
    """OpenAI's encoding `name` from `rank_file`, the vendored copy, or tiktoken (cache, then download)."""
    spec = NAMED_ENCODINGS[name]
    path = rank_file or ASSETS_DIR / f"{spec.tiktoken_name}.tiktoken"
    if rank_file is None and not path.exists():
        # An install without the vendored files: tiktoken's cache or its download. The
        # private fields are the extension API tiktoken's README documents.
        base = tiktoken.get_encoding(spec.tiktoken_name)
        return _encoding(name, base._pat_str, base._mergeable_ranks, base._special_tokens)
    return _encoding(name, spec.pattern, load_rank_file(path, spec.sha256), spec.special_tokens)


def _named_by_stem(stem: str) -> str | None:
    """The named encoding whose rank file is called `stem` (`r50k_base` is gpt2's)."""
    return next((name for name, spec in NAMED_ENCODINGS.items() if stem in (name, spec.tiktoken_name)), None)


# ----------------------------------------------------------------------------- chat formats


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    """A chat format as data: each message renders as `header` (with `{role}`), its content, then `footer`.

    Special tokens are spelled inline (`<|im_start|>`) and become their ids; the
    footer begins with the end-of-turn token, which a sampler stops at and which is
    trained on with the assistant's content. `begin` and `default_system` (the
    system message a model's own template inserts when none is given) open a
    conversation. Content is always encoded as ordinary text.
    """

    name: str
    header: str
    footer: str
    begin: str = ""
    default_system: str | None = None

    def to_jinja(self) -> str:
        """The same format as a Hugging Face / llama.cpp Jinja chat template."""
        pre, post = (_literal(part) for part in self.header.split("{role}"))
        system = ""
        if self.default_system is not None:
            opening = _literal(self.header.replace("{role}", "system") + self.default_system + self.footer)
            system = f"{{% if messages[0]['role'] != 'system' %}}{{{{ {opening} }}}}{{% endif %}}"
        return (
            f"{{{{ {_literal(self.begin)} }}}}{system}{{% for message in messages %}}"
            f"{{{{ {pre} + message['role'] + {post} + message['content'] + {_literal(self.footer)} }}}}{{% endfor %}}"
            f"{{% if add_generation_prompt %}}{{{{ {pre} + 'assistant' + {post} }}}}{{% endif %}}"
        )

    @classmethod
    def from_jinja(cls, source: str, special_tokens: Iterable[str]) -> ChatTemplate | None:
        """The format of a model's Jinja template when it is ChatML or Llama 3's, else None."""
        special = set(special_tokens)
        if {"<|im_start|>", "<|im_end|>"} <= special and "<|im_start|>" in source:
            match = re.search(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", source, re.DOTALL)
            # A literal default only: in some templates (Qwen's) the match is Jinja building the system turn.
            literal = match and not any(code in match.group(1) for code in ("{{", "{%", "' +", "+ '", "messages["))
            return cls("chatml", "<|im_start|>{role}\n", "<|im_end|>\n",
                       default_system=match.group(1) if literal else None)
        if {"<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"} <= special and "<|start_header_id|>" in source:
            begin = "<|begin_of_text|>" if "<|begin_of_text|>" in special else ""
            return cls("llama3", "<|start_header_id|>{role}<|end_header_id|>\n\n", "<|eot_id|>", begin=begin)
        return None


def _literal(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


# The project's own format (see the module docstring).
OUR_CHAT = ChatTemplate("llm", f"{IM_START}{{role}}{IM_SEP}", IM_END)


# ----------------------------------------------------------------------------- the tokenizer


class Tokenizer:
    """A tiktoken Encoding, its chat format and document tokens; text is always encoded as ordinary text.

    With the default chat format (ours) the encoding must carry every control token
    of SPECIAL_TOKENS. A real model's tokenizer brings its own format
    (`ChatTemplate`), or None when it has none this project can render; `bos` opens
    a document (None: nothing is prepended) and `eot` ends one.
    """

    def __init__(self, encoding: tiktoken.Encoding, chat_template: ChatTemplate | None = OUR_CHAT,
                 bos: str | None = ENDOFTEXT, eot: str = ENDOFTEXT, dropped: Iterable[int] = ()):
        if chat_template == OUR_CHAT:
            missing = [token for token in SPECIAL_TOKENS if token not in encoding.special_tokens_set]
            if missing:
                raise ValueError(
                    f"encoding {encoding.name} lacks control tokens {missing}; build it with Tokenizer.load or train_bpe"
                )
        self.encoding = encoding
        self.chat_template = chat_template
        self.bos_token, self.eot_token = bos, eot
        # Placeholder ids of bytes the model's vocabulary lacks (the top ids): encoding drops them.
        self.dropped = frozenset(dropped)
        if self.dropped and min(self.dropped) != encoding.n_vocab - len(self.dropped):
            raise ValueError(f"encoding {encoding.name}: dropped byte ids {sorted(self.dropped)[:4]} must be its top ids")
        specials = sorted(encoding.special_tokens_set, key=len, reverse=True)
        # Splits template strings into special tokens and text; never applied to content.
        self._specials_re = re.compile("(" + "|".join(map(re.escape, specials)) + ")") if specials else None
        named = [bos, eot]
        if chat_template is not None:
            t = chat_template
            named += [piece for piece in self._pieces(t.begin + t.header + t.footer) if isinstance(piece, str)
                      and piece in encoding.special_tokens_set]
            first = self._pieces(t.footer)[:1]
            if not first or first[0] not in encoding.special_tokens_set:
                raise ValueError(f"chat template {t.name!r}: its footer {t.footer!r} must begin with one of "
                                 f"{encoding.name}'s special tokens (the end of a turn)")
        unknown = [token for token in named if token is not None and token not in encoding.special_tokens_set]
        if unknown:
            raise ValueError(f"encoding {encoding.name} has no special tokens {unknown} (its bos, eot or chat template)")

    def _pieces(self, template_text: str) -> list[str]:
        """A trusted template string cut into special tokens and the text between them."""
        if self._specials_re is None:
            return [template_text] if template_text else []
        return [piece for piece in self._specials_re.split(template_text) if piece]

    @classmethod
    def load(cls, spec: str | os.PathLike) -> Tokenizer:
        """A named encoding (`gpt2`, `cl100k_base`, `o200k_base`) or a `.tiktoken` rank file.

        A rank file is read with its JSON sidecar (`x.tiktoken` + `x.json`, as `save`
        writes them); without one, its stem must name one of OpenAI's encodings
        (`o200k_base.tiktoken`), whose pattern and special tokens are then used.
        """
        if isinstance(spec, str) and spec in NAMED_ENCODINGS:
            return cls(_named_encoding(spec))
        path = Path(spec)
        if path.suffix != ".tiktoken":
            raise ValueError(
                f"unknown encoding {str(spec)!r}: expected one of {sorted(NAMED_ENCODINGS)} or a path to a .tiktoken rank file"
            )
        if not path.is_file():
            raise FileNotFoundError(f"no tiktoken rank file at {path}")
        sidecar = path.with_suffix(".json")
        if sidecar.is_file():
            meta = json.loads(sidecar.read_text())
            ranks = load_rank_file(path, meta["rank_file_sha256"])
            # Files written before chat templates were data hold our format: no key means ours.
            template = meta.get("chat_template", dataclasses.asdict(OUR_CHAT))
            template = template and ChatTemplate(**template)
            if template == OUR_CHAT:  # ours gains control tokens appended since the file was written
                return cls(_encoding(meta["name"], meta["pattern"], ranks, meta["special_tokens"]))
            encoding = tiktoken.Encoding(meta["name"], pat_str=meta["pattern"], mergeable_ranks=ranks,
                                         special_tokens=meta["special_tokens"])
            return cls(encoding, template, bos=meta.get("bos", ENDOFTEXT), eot=meta.get("eot", ENDOFTEXT),
                       dropped=meta.get("dropped", ()))
        name = _named_by_stem(path.stem)
        if name is None:
            raise ValueError(
                f"{path} has no sidecar {sidecar.name} and its name is not one of OpenAI's encodings: cannot tell its split pattern"
            )
        return cls(_named_encoding(name, path))

    def save(self, path: str | os.PathLike) -> None:
        """Writes the ranks to `path` (a `.tiktoken` file) and name, pattern and special tokens to its `.json` sidecar."""
        path = Path(path)
        if path.suffix != ".tiktoken":
            raise ValueError(f"a tokenizer is saved as a .tiktoken rank file, got {path}")
        path.parent.mkdir(parents=True, exist_ok=True)
        save_rank_file(self.encoding._mergeable_ranks, path)
        meta = {
            "name": self.name,
            "pattern": self.encoding._pat_str,
            "special_tokens": self.encoding._special_tokens,
            "rank_file_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "chat_template": self.chat_template and dataclasses.asdict(self.chat_template),
            "bos": self.bos_token,
            "eot": self.eot_token,
            "dropped": sorted(self.dropped),
        }
        path.with_suffix(".json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")

    @property
    def name(self) -> str:
        return self.encoding.name

    @property
    def n_vocab(self) -> int:
        """One more than the largest id: the size an embedding table needs."""
        return self.encoding.n_vocab - len(self.dropped)

    @property
    def eot(self) -> int:
        """The token that ends a document (`<|endoftext|>` for ours and OpenAI's)."""
        return self.token_id(self.eot_token)

    @property
    def bos(self) -> list[int]:
        """What a document starts with: `<|endoftext|>` for ours, `<|begin_of_text|>` for Llama 3; may be empty."""
        return [] if self.bos_token is None else [self.token_id(self.bos_token)]

    @property
    def document_start(self) -> list[int]:
        """What every pretraining document and base-model prompt starts with: `bos`, else the end-of-text token.

        Ours and GPT-2's start documents with `<|endoftext|>` (their `bos`), Llama 3
        with `<|begin_of_text|>`; a model without a BOS (SmolLM2) saw documents
        separated by its end-of-text token, so that marks the start.
        """
        return self.bos or [self.eot]

    @property
    def end_of_turn(self) -> int:
        """The token that ends a chat turn, where a sampler stops."""
        return self.token_id(self._pieces(self._template().footer)[0])

    @property
    def turn_end_ids(self) -> list[int]:
        """The ids that close a turn: the end-of-turn token and whatever the format puts after it."""
        ids, _ = self._encode_segments(self._template_segments(self._template().footer, trained=False))
        return ids

    def has_tool(self, tool: str) -> bool:
        """Whether the encoding has the call and output tokens of `tool`."""
        return all(token in self.encoding.special_tokens_set for token in tool_tokens(tool))

    def token_id(self, special_token: str) -> int:
        """The id of a special token such as `<|im_start|>`."""
        try:
            return self.encoding._special_tokens[special_token]
        except KeyError:
            raise KeyError(f"{special_token!r} is not a special token of {self.name}") from None

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` as ordinary text: a spelled-out control token stays text."""
        ids = self.encoding.encode_ordinary(text)
        return [i for i in ids if i not in self.dropped] if self.dropped else ids

    def encode_allowing_special(self, text: str) -> list[int]:
        """Token ids of trusted text in which spelled special tokens become those tokens (never user text)."""
        ids = self.encoding.encode(text, allowed_special="all")
        return [i for i in ids if i not in self.dropped] if self.dropped else ids

    def encode_batch(self, texts: Sequence[str], num_threads: int = 8) -> list[list[int]]:
        """`encode` of many texts on a thread pool; tiktoken releases the GIL while it encodes."""
        texts = list(texts)
        if num_threads <= 1:
            return self._encode_all(texts)
        # A few chunks per thread rather than tiktoken's one pool task per text: passing
        # the GIL back and forth for every text costs a fifth to a third of the
        # throughput (BENCHMARKS.md).
        size = max(1, -(-len(texts) // (4 * num_threads)))
        chunks = [texts[i : i + size] for i in range(0, len(texts), size)]
        with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
            return [ids for chunk in pool.map(self._encode_all, chunks) for ids in chunk]

    def _encode_all(self, texts: Sequence[str]) -> list[list[int]]:
        if self.dropped:
            return [self.encode(text) for text in texts]
        return [self.encoding.encode_ordinary(text) for text in texts]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of token ids; bytes that are not valid UTF-8 become U+FFFD."""
        return self.encoding.decode([int(i) for i in ids], errors="replace")

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The exact bytes of token ids."""
        return self.encoding.decode_bytes([int(i) for i in ids])

    def render_conversation(self, messages: Sequence[Mapping[str, Any]], *, start: bool = True) -> tuple[list[int], list[int]]:
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
        ids, mask, state = self._render(messages, start)
        if state != _CLOSED:
            raise ValueError(
                "the conversation ends inside an assistant turn: a tool call or output awaits the assistant's answer"
            )
        return ids, mask

    def render_for_completion(self, messages: Sequence[Mapping[str, Any]], *, start: bool = True) -> list[int]:
        """Token ids that prompt for the next assistant message: the conversation and an open assistant turn."""
        ids, _, state = self._render(messages, start, open_assistant=True)
        if state not in (_CLOSED, _OPEN):
            raise ValueError(f"the last message calls {state} but no tool message gives its output")
        return ids

    def _template(self) -> ChatTemplate:
        if self.chat_template is None:
            raise ValueError(f"tokenizer {self.name} has no chat format this project can render (its model brought none)")
        return self.chat_template

    def _template_segments(self, text: str, trained: bool, role: str = "") -> list[tuple[str | int, bool]]:
        """Segments of trusted template text: special tokens as ids, the rest (role names included) as text."""
        special = self.encoding.special_tokens_set
        return [(self.token_id(piece) if piece in special else piece, trained)
                for piece in self._pieces(text.replace("{role}", role))]

    def _tool_id(self, token: str) -> int:
        if token not in self.encoding.special_tokens_set:
            raise ValueError(f"tokenizer {self.name} has no tool tokens ({token!r}): this model cannot call tools")
        return self.token_id(token)

    def _render(self, messages: Sequence[Mapping[str, Any]], start: bool, open_assistant: bool = False
                ) -> tuple[list[int], list[int], str]:
        """Ids, mask and the final state: _CLOSED, _OPEN (turn continues after a tool output) or the tool awaiting output."""
        template = self._template()
        segments: list[tuple[str | int, bool]] = []  # text or a special token's id, and whether it is trained

        def header(role: str) -> None:
            segments.extend(self._template_segments(template.header, False, role))

        def footer(trained: bool) -> None:
            end, *rest = self._template_segments(template.footer, False)
            segments.extend([(end[0], trained), *rest])

        if start:
            segments.extend(self._template_segments(template.begin, False))
            if template.default_system is not None and (not messages or messages[0].get("role") != "system"):
                header("system")
                segments.append((template.default_system, False))
                footer(False)
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
                segments.extend([(self._tool_id(out_start), False), (parts[0][1], False), (self._tool_id(out_end), False)])
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
                    segments.extend([(self._tool_id(call_start), trained), (text, trained),
                                     (self._tool_id(call_end), trained)])
            last_kind = parts[-1][0] if parts else "text"
            if last_kind == "text":
                footer(trained)
                state = _CLOSED
            else:
                state = last_kind  # the turn stays open for the tool's output
        if open_assistant and state == _CLOSED:
            header("assistant")
        ids, mask = self._encode_segments(segments)
        return ids, mask, state

    def _encode_segments(self, segments: Sequence[tuple[str | int, bool]]) -> tuple[list[int], list[int]]:
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
            tokens = self.encode(text)
            ids.extend(tokens)
            if len({trained for _, trained in run}) == 1:
                mask.extend([int(run[0][1])] * len(tokens))
            else:  # per token: does its byte span overlap a trained segment's?
                trained_bytes = []
                for t, trained in run:
                    trained_bytes += [trained] * len(t.encode("utf-8", errors="surrogatepass"))
                offset = 0
                for token in tokens:
                    width = len(self.encoding.decode_single_token_bytes(token))
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

    def __repr__(self) -> str:
        return f"Tokenizer({self.name!r}, n_vocab={self.n_vocab})"


_CLOSED, _OPEN = "<closed>", "<open>"  # rendering states besides "a call of this tool awaits its output"


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


# ----------------------------------------------------------------------------- our BPE


def train_bpe(
    texts: Iterable[str],
    vocab_size: int,
    *,
    name: str = "bpe",
    pattern: str = GPT4_SPLIT_PATTERN,
    progress: bool = True,
) -> Tokenizer:
    """Trains a byte-level BPE with rustbpe; `vocab_size` includes the control tokens, which take the last ids."""
    import rustbpe  # only training needs it: loading a trained tokenizer needs tiktoken alone

    n_ranks = vocab_size - len(SPECIAL_TOKENS)
    if n_ranks <= 256:
        raise ValueError(
            f"vocab_size {vocab_size} leaves no merges: it must exceed 256 bytes + {len(SPECIAL_TOKENS)} control tokens"
        )
    bpe = rustbpe.Tokenizer()
    texts = tqdm(texts, desc=f"bpe {name}: reading", unit=" docs", disable=not progress)
    bpe.train_from_iterator(texts, vocab_size=n_ranks, pattern=pattern)
    if bpe.vocab_size < n_ranks:  # rustbpe stops quietly when no pair repeats
        raise ValueError(
            f"the corpus supports only {bpe.vocab_size - 256} merges, {n_ranks - 256} asked: give more text or a smaller vocab_size"
        )
    ranks = {bytes(token): rank for token, rank in bpe.get_mergeable_ranks()}
    return Tokenizer(_encoding(name, bpe.get_pattern(), ranks, {}))


# ----------------------------------------------------------------------------- corpora and compression


def read_texts(path: str | os.PathLike, limit: int | None = None, field: str = "text") -> Iterator[str]:
    """Documents of a corpus: `field` of each `.jsonl`/`.jsonl.gz` record, or a whole `.txt`/`.txt.gz` file as one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no corpus at {path}")
    kind = path.with_suffix("").suffix if path.suffix == ".gz" else path.suffix
    if kind not in (".jsonl", ".txt"):
        raise ValueError(f"{path}: expected a .jsonl, .jsonl.gz, .txt or .txt.gz corpus")
    with (gzip.open if path.suffix == ".gz" else open)(path, "rt", encoding="utf-8") as f:
        documents = (f.read(),) if kind == ".txt" else (json.loads(line)[field] for line in f)
        yield from itertools.islice(documents, limit)


@dataclasses.dataclass(frozen=True)
class Compression:
    """How many UTF-8 bytes of a corpus one token carries."""

    n_documents: int
    n_bytes: int
    n_tokens: int

    @property
    def bytes_per_token(self) -> float:
        return self.n_bytes / max(self.n_tokens, 1)


def compression(tok: Tokenizer, texts: Iterable[str], *, num_threads: int = 8, batch_size: int = 1024) -> Compression:
    """Bytes per token of `tok` over a corpus, streamed in batches."""
    n_documents = n_bytes = n_tokens = 0
    texts = iter(texts)
    while batch := list(itertools.islice(texts, batch_size)):
        n_documents += len(batch)
        # JSON can escape lone surrogates; tiktoken reads each as U+FFFD, also three bytes.
        n_bytes += sum(len(text.encode("utf-8", errors="surrogatepass")) for text in batch)
        n_tokens += sum(map(len, tok.encode_batch(batch, num_threads=num_threads)))
    return Compression(n_documents, n_bytes, n_tokens)
