"""Tools the model can call while sampling: a calculator and a search over local documents.

A tool is a function `str -> str`: it takes the text the model wrote between a
tool's call tokens and returns the text forced back between its output tokens.
Tools never raise: a refusal or failure comes back as `"Error: ..."` output, which
the model sees (and can learn from) instead of the engine crashing. (The engine
also turns an exception from any registered tool into such output.)
"""

from __future__ import annotations

import ast
import math
import operator
import time
from typing import Callable, Sequence

Tool = Callable[[str], str]


class CalculatorError(ValueError):
    pass


_BINARY = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


class Calculator:
    """Arithmetic on numbers through a whitelist walk of Python's AST.

    Only number literals, + - * / // % **, unary signs and parentheses exist here:
    no names, calls, attributes, subscripts or comprehensions, so nothing can import,
    loop or reach an object. Work is bounded by the size of the expression, by
    exponents (|b| <= max_exponent) and by the magnitude of every intermediate
    result; a deadline is still checked at each node as a last line of defence.
    """

    def __init__(self, max_chars: int = 256, max_nodes: int = 128, max_exponent: int = 64,
                 max_abs: float = 1e100, timeout_s: float = 0.1):
        self.max_chars, self.max_nodes, self.max_exponent = max_chars, max_nodes, max_exponent
        self.max_abs, self.timeout_s = max_abs, timeout_s

    def __call__(self, expression: str) -> str:
        try:
            return _format_number(self.evaluate(expression))
        except (CalculatorError, ArithmeticError) as e:
            return f"Error: {e}"

    def evaluate(self, expression: str) -> float | int:
        expression = expression.strip().replace(",", "")  # "1,234" is how people (and GSM8K) write numbers
        if len(expression) > self.max_chars:
            raise CalculatorError(f"expression longer than {self.max_chars} characters")
        try:
            tree = ast.parse(expression, mode="eval")
        except SyntaxError:
            raise CalculatorError(f"not an arithmetic expression: {expression!r}") from None
        if sum(1 for _ in ast.walk(tree)) > self.max_nodes:
            raise CalculatorError(f"expression has more than {self.max_nodes} parts")
        return self._eval(tree.body, time.monotonic() + self.timeout_s)

    def _eval(self, node: ast.AST, deadline: float) -> float | int:
        if time.monotonic() > deadline:
            raise CalculatorError("took too long")
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return self._bounded(node.value)
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return _UNARY[type(node.op)](self._eval(node.operand, deadline))
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            left, right = self._eval(node.left, deadline), self._eval(node.right, deadline)
            if isinstance(node.op, ast.Pow):
                if abs(right) > self.max_exponent:
                    raise CalculatorError(f"exponent {right} is larger than {self.max_exponent}")
                # |left ** right| = 10 ** (right * log10|left|): a big base or a tiny one under a negative exponent.
                if left != 0 and right * math.log10(abs(left)) > math.log10(self.max_abs):
                    raise CalculatorError(f"result would exceed {self.max_abs:g}")
            return self._bounded(_BINARY[type(node.op)](left, right))
        raise CalculatorError(f"{type(node).__name__} is not allowed: only numbers and + - * / // % ** ( )")

    def _bounded(self, value: float | int | complex) -> float | int:
        if isinstance(value, complex):
            raise CalculatorError("the result is not a real number")
        if abs(value) > self.max_abs:
            raise CalculatorError(f"result exceeds {self.max_abs:g}")
        return value


def _format_number(value: float | int) -> str:
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value) if isinstance(value, float) else str(value)


class Search:
    """BM25 search over a local collection of documents (bm25s); returns the top hits' text."""

    def __init__(self, documents: Sequence[str], top_k: int = 2, max_chars: int = 500):
        import bm25s

        if not documents:
            raise ValueError("Search needs at least one document")
        self.documents, self.top_k, self.max_chars = list(documents), min(top_k, len(documents)), max_chars
        self._bm25s = bm25s
        self._index = bm25s.BM25()
        self._index.index(bm25s.tokenize(self.documents, stopwords="en", show_progress=False), show_progress=False)

    def __call__(self, query: str) -> str:
        tokens = self._bm25s.tokenize([query], stopwords="en", show_progress=False)
        if not tokens.vocab:
            return "Error: the query has no searchable words"
        hits, scores = self._index.retrieve(tokens, k=self.top_k, show_progress=False)
        found = [self.documents[i][: self.max_chars] for i, s in zip(hits[0], scores[0]) if s > 0]
        return "\n\n".join(found) if found else "No results."
