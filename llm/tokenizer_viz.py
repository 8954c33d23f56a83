"""Token visualizer in the spirit of the Tiktokenizer page: coloured token boundaries with their ids.

`to_ansi` is for terminals (`python -m launch.tokenize --text ...`), `to_html` for
notebooks (`IPython.display.HTML(to_html(tok, ids))`). Given a loss mask (from
`Tokenizer.render_conversation`) both underline the tokens that are trained on.
"""

from __future__ import annotations

import html
from collections.abc import Sequence

from llm.tokenizer import Tokenizer

# Pastel backgrounds that keep black text readable: (xterm-256 colour, CSS colour).
_COLOURS = (
    (153, "#afd7ff"),
    (194, "#d7ffd7"),
    (223, "#ffd7af"),
    (225, "#ffd7ff"),
    (230, "#ffffd7"),
    (159, "#afffff"),
    (217, "#ffafaf"),
    (189, "#d7d7ff"),
)


def token_pieces(tok: Tokenizer, ids: Sequence[int]) -> list[str]:
    """The text of each token; bytes of a character split across tokens show as `\\xNN` escapes."""
    return [tok.encoding.decode_single_token_bytes(i).decode("utf-8", errors="backslashreplace") for i in ids]


def _check_mask(ids: Sequence[int], mask: Sequence[int] | None) -> Sequence[int]:
    if mask is not None and len(mask) != len(ids):
        raise ValueError(f"mask has {len(mask)} entries for {len(ids)} tokens")
    return mask if mask is not None else [0] * len(ids)


def to_ansi(tok: Tokenizer, ids: Sequence[int], mask: Sequence[int] | None = None) -> str:
    """Tokens on coloured backgrounds, then their ids in the same colours, for a terminal."""
    mask = _check_mask(ids, mask)

    def paint(text: str, k: int, underline: int) -> str:
        return f"\x1b[30;48;5;{_COLOURS[k % len(_COLOURS)][0]}{';4' if underline else ''}m{text}\x1b[0m"

    def paint_piece(piece: str, k: int, underline: int) -> str:
        # A newline gets a visible mark and stays outside the colour codes, which would
        # otherwise bleed into the next line.
        return "\n".join(paint(line, k, underline) for line in piece.replace("\n", "↵\n").split("\n"))

    pieces = "".join(paint_piece(p, k, m) for k, (p, m) in enumerate(zip(token_pieces(tok, ids), mask)))
    numbers = " ".join(paint(str(i), k, m) for k, (i, m) in enumerate(zip(ids, mask)))
    n_bytes = len(tok.decode_bytes(ids))
    summary = f"{tok.name}: {len(ids)} tokens, {n_bytes} bytes, {n_bytes / max(len(ids), 1):.2f} bytes/token"
    return f"{pieces}\n\n{numbers}\n\n{summary}"


def to_html(tok: Tokenizer, ids: Sequence[int], mask: Sequence[int] | None = None) -> str:
    """Tokens as coloured spans (hover for the id), then the ids, for a notebook."""
    mask = _check_mask(ids, mask)

    def span(text: str, k: int, underline: int, title: str) -> str:
        style = f"background:{_COLOURS[k % len(_COLOURS)][1]};color:black" + (
            ";text-decoration:underline" if underline else ""
        )
        return f'<span style="{style}" title="{title}">{html.escape(text)}</span>'

    pieces = "".join(span(p, k, m, f"id {i}") for k, (p, i, m) in enumerate(zip(token_pieces(tok, ids), ids, mask)))
    numbers = " ".join(span(str(i), k, m, f"id {i}") for k, (i, m) in enumerate(zip(ids, mask)))
    block = '<div style="font-family:monospace;white-space:pre-wrap;line-height:1.7;margin-bottom:0.8em">{}</div>'
    return (
        block.format(f"<b>{html.escape(tok.name)}</b>: {len(ids)} tokens")
        + block.format(pieces)
        + block.format(numbers)
    )
