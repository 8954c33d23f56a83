"""tiktoken encodings: OpenAI's named ones, their rank files, and the control tokens this project adds.

* Named encodings (`gpt2`, `cl100k_base`, `o200k_base`) load from the rank files
  vendored in `llm/assets/tiktoken/` (byte-identical to OpenAI's, hash-checked),
  from a local `.tiktoken` file, or through tiktoken and its cache
  (`TIKTOKEN_CACHE_DIR`) when the vendored copy is absent.
* Every encoding of ours carries the control tokens of `SPECIAL_TOKENS`
  (`<|endoftext|>`, the chat tokens, tool-call pairs) as special tokens, after
  its ranks: existing ids are kept and o200k_base's chat tokens take GPT-4o's ids.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import os
from collections.abc import Mapping
from pathlib import Path

import tiktoken

from llm.chat_format import IM_END, IM_SEP, IM_START, TOOLS, tool_tokens

ASSETS_DIR = Path(__file__).parent / "assets" / "tiktoken"

ENDOFTEXT = "<|endoftext|>"

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


def build_encoding(name: str, pattern: str, ranks: dict[bytes, int], special_tokens: Mapping[str, int]
                   ) -> tiktoken.Encoding:
    """A tiktoken Encoding that carries every control token of SPECIAL_TOKENS."""
    return tiktoken.Encoding(
        name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=control_token_ids(name, ranks, special_tokens)
    )


def named_encoding(name: str, rank_file: Path | None = None) -> tiktoken.Encoding:
    """OpenAI's encoding `name` from `rank_file`, the vendored copy, or tiktoken (cache, then download)."""
    spec = NAMED_ENCODINGS[name]
    path = rank_file or ASSETS_DIR / f"{spec.tiktoken_name}.tiktoken"
    if rank_file is None and not path.exists():
        # An install without the vendored files: tiktoken's cache or its download. The
        # private fields are the extension API tiktoken's README documents.
        base = tiktoken.get_encoding(spec.tiktoken_name)
        return build_encoding(name, base._pat_str, base._mergeable_ranks, base._special_tokens)
    return build_encoding(name, spec.pattern, load_rank_file(path, spec.sha256), spec.special_tokens)


def named_by_stem(stem: str) -> str | None:
    """The named encoding whose rank file is called `stem` (`r50k_base` is gpt2's)."""
    return next((name for name, spec in NAMED_ENCODINGS.items() if stem in (name, spec.tiktoken_name)), None)
