"""Tokenizer: a tiktoken Encoding with our control tokens, its document tokens and its chat format.

Everything a model reads goes through `Tokenizer`, a thin wrapper over a
`tiktoken.Encoding`:

* Named encodings (`gpt2`, `cl100k_base`, `o200k_base`) and the control tokens
  every encoding of ours carries come from `llm/encodings.py`.
* Our own BPE (`llm/bpe.py`) is saved as a tiktoken rank file plus a JSON sidecar
  (name, split pattern, special tokens, chat format, document tokens), so loading
  it needs tiktoken only.
* Control tokens (`<|endoftext|>`, the chat tokens, tool-call pairs) are special
  tokens. All text, from users, documents or tools, goes through
  `encode_ordinary`, so text that spells a control token never becomes one.

The chat format is data (`ChatTemplate`; ours is `OUR_CHAT`) and is rendered by
`llm/chat_format.py`; a real model's tokenizer (`llm/hf_tokenizer.py`) brings its own.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import tiktoken

from llm import chat_format
from llm.chat_format import OUR_CHAT, ChatTemplate, tool_tokens
from llm.encodings import (
    ENDOFTEXT,
    NAMED_ENCODINGS,
    SPECIAL_TOKENS,
    build_encoding,
    load_rank_file,
    named_by_stem,
    named_encoding,
    save_rank_file,
)


class Tokenizer:
    """A tiktoken Encoding, its chat format and document tokens; text is always encoded as ordinary text.

    With the default chat format (ours) the encoding must carry every control token
    of SPECIAL_TOKENS. A real model's tokenizer brings its own format
    (`ChatTemplate`), or None when it has none this project can render; `bos` opens
    a document (None: nothing is prepended) and `eot` ends one. `prompt_start` is
    what the model's own files say a prompt starts with (its BOS, or nothing);
    None: `document_start`, how our tokenizers and OpenAI's encodings were trained.
    """

    def __init__(self, encoding: tiktoken.Encoding, chat_template: ChatTemplate | None = OUR_CHAT,
                 bos: str | None = ENDOFTEXT, eot: str = ENDOFTEXT, dropped: Iterable[int] = (),
                 prompt_start: Sequence[str] | None = None):
        if chat_template == OUR_CHAT:
            missing = [token for token in SPECIAL_TOKENS if token not in encoding.special_tokens_set]
            if missing:
                raise ValueError(
                    f"encoding {encoding.name} lacks control tokens {missing}; build it with Tokenizer.load or train_bpe"
                )
        self.encoding = encoding
        self.chat_template = chat_template
        self.bos_token, self.eot_token = bos, eot
        self.prompt_start_tokens = None if prompt_start is None else tuple(prompt_start)
        # Placeholder ids of bytes the model's vocabulary lacks (the top ids): encoding drops them.
        self.dropped = frozenset(dropped)
        if self.dropped and min(self.dropped) != encoding.n_vocab - len(self.dropped):
            raise ValueError(f"encoding {encoding.name}: dropped byte ids {sorted(self.dropped)[:4]} must be its top ids")
        specials = sorted(encoding.special_tokens_set, key=len, reverse=True)
        # Splits template strings into special tokens and text; never applied to content.
        self._specials_re = re.compile("(" + "|".join(map(re.escape, specials)) + ")") if specials else None
        named = [bos, eot, *(self.prompt_start_tokens or ())]
        if chat_template is not None:
            t = chat_template
            named += [piece for piece in self.split_special(t.begin + t.header + t.footer) if isinstance(piece, str)
                      and piece in encoding.special_tokens_set]
            first = self.split_special(t.footer)[:1]
            if not first or first[0] not in encoding.special_tokens_set:
                raise ValueError(f"chat template {t.name!r}: its footer {t.footer!r} must begin with one of "
                                 f"{encoding.name}'s special tokens (the end of a turn)")
        unknown = [token for token in named if token is not None and token not in encoding.special_tokens_set]
        if unknown:
            raise ValueError(f"encoding {encoding.name} has no special tokens {unknown} "
                             "(its bos, eot, prompt start or chat template)")

    def split_special(self, template_text: str) -> list[str]:
        """A trusted template string cut into the special tokens it spells and the text between them."""
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
            return cls(named_encoding(spec))
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
            # No key (written before prompts had their own rule): prompts start as documents do.
            prompt_start = meta.get("prompt_start")
            if template == OUR_CHAT:  # ours gains control tokens appended since the file was written
                return cls(build_encoding(meta["name"], meta["pattern"], ranks, meta["special_tokens"]),
                           prompt_start=prompt_start)
            encoding = tiktoken.Encoding(meta["name"], pat_str=meta["pattern"], mergeable_ranks=ranks,
                                         special_tokens=meta["special_tokens"])
            return cls(encoding, template, bos=meta.get("bos", ENDOFTEXT), eot=meta.get("eot", ENDOFTEXT),
                       dropped=meta.get("dropped", ()), prompt_start=prompt_start)
        name = named_by_stem(path.stem)
        if name is None:
            raise ValueError(
                f"{path} has no sidecar {sidecar.name} and its name is not one of OpenAI's encodings: cannot tell its split pattern"
            )
        return cls(named_encoding(name, path))

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
            "prompt_start": None if self.prompt_start_tokens is None else list(self.prompt_start_tokens),
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
        """What every document of a pretraining stream starts with: `bos`, else the end-of-text token.

        Ours and GPT-2's start documents with `<|endoftext|>` (their `bos`), Llama 3
        with `<|begin_of_text|>`; a model without a BOS (SmolLM2) saw documents
        separated by its end-of-text token, so that marks the start.
        """
        return self.bos or [self.eot]

    @property
    def prompt_start(self) -> list[int]:
        """What a base-model prompt starts with under the model's own rule; may be empty.

        A real model's files say whether its tokenizer adds a BOS (GGUF's
        `tokenizer.ggml.add_bos_token`, the post-processor of Hugging Face's
        tokenizer.json): SmolLM2 adds none, Llama 3 `<|begin_of_text|>`. Ours and
        OpenAI's encodings start prompts as their documents (`document_start`).
        """
        if self.prompt_start_tokens is None:
            return self.document_start
        return [self.token_id(token) for token in self.prompt_start_tokens]

    @property
    def end_of_turn(self) -> int:
        """The token that ends a chat turn, where a sampler stops."""
        return chat_format.end_of_turn(self)

    @property
    def chat_stop_ids(self) -> tuple[int, ...]:
        """The ids a chat sampler stops at: the end-of-turn token, then the end-of-text token (once if the same)."""
        return tuple(dict.fromkeys((self.end_of_turn, self.eot)))

    @property
    def turn_end_ids(self) -> list[int]:
        """The ids that close a turn: the end-of-turn token and whatever the format puts after it."""
        return chat_format.turn_end_ids(self)

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
        # A few chunks per thread rather than tiktoken's one pool task per text, so the GIL
        # is not passed back and forth for every text (docs/experiments/performance.md).
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

    def render_conversation(self, messages: Sequence[Mapping[str, Any]], *, start: bool = True
                            ) -> tuple[list[int], list[int]]:
        """Token ids of a conversation and its loss mask (`chat_format.render_conversation`)."""
        return chat_format.render_conversation(self, messages, start=start)

    def render_for_completion(self, messages: Sequence[Mapping[str, Any]], *, start: bool = True) -> list[int]:
        """Token ids that prompt for the next assistant message (`chat_format.render_for_completion`)."""
        return chat_format.render_for_completion(self, messages, start=start)

    def __repr__(self) -> str:
        return f"Tokenizer({self.name!r}, n_vocab={self.n_vocab})"
