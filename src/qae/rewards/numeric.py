"""The value of a simple numeric LaTeX answer, without sympy: a cheap way to tell two
answers apart.

:func:`numeric_value` reads a deliberately small grammar, the constants most answers are
made of: decimal numbers, ``+ - / \\cdot \\times``, ``\\frac{}{}``, ``\\sqrt{}``, ``\\pi``,
powers, parentheses and a trailing degree sign. Anything else gives None: letters (to
math-verify ``dr`` is one symbol, ``m`` a unit, ``e`` Euler's number), functions, percent
signs, commas, ``\\pm``, juxtaposed numbers such as ``1\\frac{4}{5}``. So a text is either
read the one way math-verify reads it or not at all (tests check this against math-verify
on random expressions). Linear in the text's length.
"""

from __future__ import annotations

import cmath
import math
import re

__all__ = ["numeric_elements", "numeric_value"]

_TOKEN = re.compile(
    r"\s*(?:(\d+(?:\.\d+)?)|(\\[dt]?frac|\\sqrt|\\pi|\\cdot|\\times|\\circ)(?![A-Za-z])"
    r"|([-+*/^(){}]))"
)
_FRACS = ("\\frac", "\\dfrac", "\\tfrac")
_SIDE_BY_SIDE = (*_FRACS, "\\sqrt", "\\pi", "(")
MAX_CHARS = 200
_MAX_EXPONENT = 64.0
_MAX_MAGNITUDE = 1e100


class _Reject(Exception):
    """The text is outside the grammar (or its value is out of range)."""


def _tokens(text: str) -> list[str]:
    out, pos = [], 0
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if match is None:
            if text[pos:].strip():
                raise _Reject
            break
        out.append(match.group(1) or match.group(2) or match.group(3))
        pos = match.end()
    return out


def _checked(value: complex) -> complex:
    if not (cmath.isfinite(value) and abs(value) < _MAX_MAGNITUDE):
        raise _Reject
    return value


class _Reader:
    """Recursive descent: expr := term (+|- term)*; term := [+|-] product (op product)*;
    product := factor factor* (side by side); factor := atom [^ exponent]."""

    def __init__(self, tokens: list[str]) -> None:
        self.tokens = tokens
        self.i = 0
        self.depth = 0  # braces and parentheses open around the current token

    def peek(self) -> str | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def take(self, expected: str | None = None) -> str:
        tok = self.peek()
        if tok is None or (expected is not None and tok != expected):
            raise _Reject
        self.i += 1
        return tok

    def expr(self) -> complex:
        value = self.term()
        while self.peek() in ("+", "-"):
            plus = self.take() == "+"
            rhs = self.term()
            value = value + rhs if plus else value - rhs
        return _checked(value)

    def term(self) -> complex:
        sign = 1.0
        if self.peek() in ("+", "-"):
            sign = -1.0 if self.take() == "-" else 1.0
        value = self.product()
        while self.peek() in ("*", "\\cdot", "\\times", "/"):
            divide = self.take() == "/"
            rhs = self.product()
            if divide and rhs == 0:
                raise _Reject
            value = value / rhs if divide else value * rhs
        return _checked(sign * value)

    def product(self) -> complex:
        """Factors side by side (``2\\sqrt{3}\\pi``) bind tighter than ``/``: ``1/2\\sqrt{3}``
        is 1/(2 sqrt 3), as math-verify reads it."""
        value = self.factor()
        while self.peek() in _SIDE_BY_SIDE:
            if self.peek() in _FRACS and self.tokens[self.i - 1][0].isdigit():
                raise _Reject  # 1\\frac{4}{5} may be the mixed number 1 4/5
            value = value * self.factor()
        return _checked(value)

    def factor(self) -> complex:
        base = self.atom()
        if self.peek() != "^":
            return base
        self.take()
        if self.tokens[self.i : self.i + 1] == ["\\circ"] or self.tokens[self.i : self.i + 3] == [
            "{",
            "\\circ",
            "}",
        ]:
            self.i += 1 if self.peek() == "\\circ" else 3
            if self.peek() is not None or self.depth:
                raise _Reject  # only a final degree sign, which math-verify drops
            return base
        if self.peek() == "{":
            exponent = self.braced()
        else:
            tok = self.take()
            if not tok.isdigit() or len(tok) != 1:  # x^23 is x^2 * 3 in LaTeX: refuse
                raise _Reject
            exponent = complex(int(tok))
        if exponent.imag or abs(exponent.real) > _MAX_EXPONENT or base == 0:
            raise _Reject
        return _checked(base**exponent.real)

    def atom(self) -> complex:
        tok = self.take()
        if tok[0].isdigit():
            if self.peek() is not None and self.peek()[0].isdigit():
                raise _Reject
            return complex(float(tok))
        if tok == "\\pi":
            if self.peek() == "(":
                raise _Reject  # math-verify reads \\pi(x) as a function call
            return complex(math.pi)
        if tok in _FRACS:
            plain = _is_number(self.tokens[self.i : self.i + 3])
            num = self.argument(digit_ok=False)
            den = self.argument(digit_ok=plain)
            if den == 0:
                raise _Reject
            return num / den
        if tok == "\\sqrt":
            inner = self.argument(digit_ok=True)
            if inner.imag or inner.real < 0:
                raise _Reject
            return complex(cmath.sqrt(inner))
        if tok in ("(", "{"):
            self.i -= 1
            return self.braced()
        raise _Reject

    def braced(self) -> complex:
        """``{expr}`` or ``(expr)``."""
        close = "}" if self.take() == "{" else ")"
        self.depth += 1
        value = self.expr()
        self.take(close)
        self.depth -= 1
        return value

    def argument(self, *, digit_ok: bool) -> complex:
        """A command's argument: ``{expr}``, or one bare digit where math-verify reads it so
        (``\\sqrt2``, ``\\frac{270}7``, outside any braces)."""
        tok = self.peek()
        if tok is not None and len(tok) == 1 and tok.isdigit():
            if not digit_ok or self.depth:
                raise _Reject
            self.i += 1
            return complex(int(tok))
        if tok != "{":
            raise _Reject
        return self.braced()


def _is_number(tokens: list[str]) -> bool:
    """Whether ``tokens`` start with ``{``, a number, ``}``."""
    return len(tokens) == 3 and tokens[0] == "{" and tokens[1][0].isdigit() and tokens[2] == "}"


def numeric_value(text: str) -> complex | None:
    """The value of ``text`` if it is a simple numeric LaTeX expression, else None.

    ``"3\\sqrt{13}"`` -> 10.816..., ``"\\frac{\\pi}{2}"`` -> 1.5707..., ``"2^{10}"`` ->
    1024, ``"90^\\circ"`` -> 90; ``"x+1"``, ``"1,000"``, ``"28\\%"`` -> None.
    """
    if not isinstance(text, str) or len(text) > MAX_CHARS:
        return None
    text = text.replace("\\left(", "(").replace("\\right)", ")")
    try:
        reader = _Reader(_tokens(text))
        if not reader.tokens:
            return None
        value = reader.expr()
        return value if reader.peek() is None else None
    except (_Reject, OverflowError, ZeroDivisionError, ValueError):
        return None


def _unwrap(text: str) -> str:
    """``text`` without one pair of brackets around all of it (``(..)``, ``[..)``, ``\\{..\\}``)."""
    if text.startswith("\\{") and text.endswith("\\}"):
        return text[2:-2]
    if len(text) < 2 or text[0] not in "([" or text[-1] not in ")]":
        return text
    depth = 0
    for i, ch in enumerate(text):
        depth += ch in "([{"
        depth -= ch in ")]}"
        if depth == 0 and i < len(text) - 1:
            return text  # the first bracket closes early: "(1)+(2)"
    return text[1:-1]


def _split(text: str) -> list[str]:
    """``text`` cut at the commas outside any brackets."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


def numeric_elements(text: str) -> list[float] | None:
    """The real values, in order, of a list of two or more simple numeric answers, or None.

    ``"(6,31,-1)"``, ``"\\left( 3, \\frac{\\pi}{2} \\right)"``, ``"3, 5, 7"``, ``"[1,2)"``
    are lists, whatever their brackets say (tuple, set, interval).
    """
    if not isinstance(text, str) or len(text) > MAX_CHARS:
        return None
    text = text.replace("\\left", "").replace("\\right", "").strip()
    parts = _split(_unwrap(text))
    if len(parts) < 2:
        return None
    values = [numeric_value(p.strip()) for p in parts]
    if any(v is None or v.imag for v in values):
        return None
    return [v.real for v in values]  # type: ignore[union-attr]
