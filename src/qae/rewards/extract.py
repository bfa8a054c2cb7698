"""Answer extraction and normalisation for math responses.

Everything here is plain string work in linear time: no regular expression that can
backtrack, no sympy. A megabyte-long response is scanned in milliseconds.

Extraction order (:func:`extract_answer`): the last ``\\boxed{...}`` / ``\\fbox{...}`` with
balanced braces, then the last DAPO-style ``Answer: ...`` line, then the configured fallback.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

__all__ = [
    "FALLBACKS",
    "answer_line",
    "extract_answer",
    "ground_truth_text",
    "last_boxed",
    "last_number",
    "normalize_answer",
]

FALLBACKS = ("none", "last_number")

_BOX_COMMANDS = ("\\boxed", "\\fbox")
# Answers longer than this are not answers; the cap also keeps sympy away from huge inputs.
MAX_ANSWER_CHARS = 1000

_MAX_BOX_TRIES = 32
_BOX_TOKEN = re.compile(r" +([^\s$]+)")
_ANSWER_LINE = re.compile(r"(?i)answer\s*:[ \t]*([^\n]*)")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def _balanced(text: str, open_pos: int) -> str | None:
    """Content of the brace group opening at ``text[open_pos] == '{'``, or None.

    ``\\{`` and ``\\}`` are literal braces and do not count. Gives up (None) when the group
    does not close within ``MAX_ANSWER_CHARS`` characters, which bounds the work per box.
    """
    depth = 0
    stop = min(len(text), open_pos + MAX_ANSWER_CHARS + 2)
    for i in range(open_pos, stop):
        ch = text[i]
        if ch not in "{}" or (i > 0 and text[i - 1] == "\\"):
            continue
        depth += 1 if ch == "{" else -1
        if depth == 0:
            return text[open_pos + 1 : i]
    return None


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` or ``\\fbox{...}`` in ``text`` (braces balanced).

    ``\\boxed 5`` (the command, a space and one token) is accepted too. An unclosed last box
    (a truncated response) falls back to the box before it; at most ``_MAX_BOX_TRIES`` boxes
    are tried from the end. Returns None when there is no complete box.
    """
    if not isinstance(text, str):
        return None
    end = len(text)
    for _ in range(_MAX_BOX_TRIES):
        pos = max(text.rfind(cmd, 0, end) for cmd in _BOX_COMMANDS)
        if pos < 0:
            return None
        cmd = next(c for c in _BOX_COMMANDS if text.startswith(c, pos))
        j = pos + len(cmd)
        if j < len(text) and text[j] == "{":
            content = _balanced(text, j)
            if content is not None:
                return content.strip()
        elif j < len(text) and text[j] == " ":
            token = _BOX_TOKEN.match(text, j, j + MAX_ANSWER_CHARS)
            if token:
                return token.group(1)
        end = pos
    return None


def answer_line(text: str) -> str | None:
    """The text after the last ``Answer:`` (case-insensitive) up to the end of its line.

    This is the DAPO convention ("The last line of your response should be of the form
    Answer: $Answer"). Surrounding ``$`` and a trailing period are removed. Returns None when
    there is no such line or it is empty.
    """
    if not isinstance(text, str):
        return None
    last = None
    for match in _ANSWER_LINE.finditer(text):
        last = match
    if last is None:
        return None
    ans = last.group(1).strip()
    boxed = last_boxed(ans)
    if boxed is not None:
        return boxed
    ans = ans.strip().rstrip(".").strip()
    if len(ans) >= 2 and ans.startswith("$") and ans.endswith("$"):
        ans = ans.strip("$").strip()
    return ans or None


def last_number(text: str) -> str | None:
    """The last number written in ``text`` (``-3``, ``1,000``, ``2.5``), or None."""
    if not isinstance(text, str):
        return None
    last = None
    for match in _NUMBER.finditer(text):
        last = match
    return None if last is None else last.group(0).replace(",", "")


def extract_answer(
    text: str, *, fallback: str | Callable[[str], str | None] = "none"
) -> str | None:
    """The final answer of a response: last box, else last ``Answer:`` line, else fallback.

    Args:
        text: the model's response.
        fallback: what to try when neither a box nor an ``Answer:`` line is present:
            ``"none"`` (no answer), ``"last_number"`` (the last number in the text), or a
            callable ``text -> str | None``.

    Returns:
        The answer string, or None when there is none (also for non-string input).
    """
    if not isinstance(text, str) or not text:
        return None
    ans = last_boxed(text)
    if ans is None:
        ans = answer_line(text)
    if ans is None:
        if callable(fallback):
            ans = fallback(text)
        elif fallback == "last_number":
            ans = last_number(text)
        elif fallback != "none":
            raise ValueError(f"unknown fallback={fallback!r}; expected one of {FALLBACKS}")
    if ans is not None:
        ans = ans.strip()
    return ans or None


def ground_truth_text(ground_truth: object) -> str:
    """A ground truth as answer text: ints and integral floats without ``.0``, strings stripped.

    ``27.0 -> "27"``, ``7 -> "7"``, ``0.5 -> "0.5"``, ``"\\boxed{3}" -> "3"``,
    GSM8K-style ``"... #### 1,000" -> "1000"``.
    """
    if isinstance(ground_truth, bool):
        return str(int(ground_truth))
    if isinstance(ground_truth, int):
        return str(ground_truth)
    if isinstance(ground_truth, float):
        if math.isfinite(ground_truth) and ground_truth == int(ground_truth):
            return str(int(ground_truth))
        return repr(ground_truth)
    text = str(ground_truth).strip()
    if "####" in text:
        text = text.rsplit("####", 1)[1].strip().replace(",", "")
    boxed = last_boxed(text)
    if boxed is not None and text.startswith(_BOX_COMMANDS):
        text = boxed
    if len(text) >= 2 and text.startswith("$") and text.endswith("$"):
        text = text.strip("$").strip()
    return text


_TEXT_WRAP = re.compile(r"\\(?:text|textbf|mathrm|mathbf|mbox)\{([^{}]*)\}")
_DROP = (
    "\\left",
    "\\right",
    "\\!",
    "\\,",
    "\\;",
    "\\:",
    "\\displaystyle",
    "^{\\circ}",
    "^\\circ",
    "\\circ",
    "\\%",
    "%",
    "$",
)
_INT_WITH_COMMAS = re.compile(r"^-?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_DECIMAL = re.compile(r"^-?\d+\.\d+$")


def normalize_answer(answer: str | None) -> str | None:
    """A canonical string for majority voting (maj@n): equal strings mean the same answer.

    Cheap and purely textual (no sympy): removes spacing, ``$``, ``\\left``/``\\right``,
    degree and percent marks, ``\\text{}`` wrappers, a trailing period; ``\\dfrac`` and
    ``\\tfrac`` become ``\\frac``; ``1,000`` becomes ``1000`` and ``27.0`` becomes ``27``.
    """
    if answer is None:
        return None
    s = str(answer).strip()[:MAX_ANSWER_CHARS]
    for _ in range(10):  # to a fixed point: removing "$" from "\\$," exposes "\\,"
        nxt = _normalize_once(s)
        if nxt == s:
            break
        s = nxt
    return s or None


def _normalize_once(s: str) -> str:
    s = _TEXT_WRAP.sub(r"\1", s)
    for token in _DROP:
        s = s.replace(token, "")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = "".join(s.split()).rstrip(".")
    if _INT_WITH_COMMAS.match(s):
        s = s.replace(",", "")
    if _DECIMAL.match(s):
        s = s.rstrip("0").rstrip(".")
        if s in ("", "-"):
            s = "0"
    if s == "-0":
        s = "0"
    return s
