"""Answer extraction and normalisation for math responses.

Everything here is plain string work in linear time: no regular expression that can
backtrack, no sympy. A megabyte-long response is scanned in milliseconds.

Where the final answer is (:func:`extract_candidates`, first found first):

1. **Marked answers**, of which the one stated *last* wins: a ``\\boxed{}`` (several boxes
   joined only by "and", commas or spacing count as one multi-part answer), a DAPO-style
   ``Answer: ...`` line, or a "final answer is ..." phrase. A later final-answer line thus
   overrides an intermediate box, and a box written after an ``Answer:`` line overrides it.
2. The word "answer" followed within 50 characters by math: ``Answer $9$``,
   ``the answer is 9``.
3. The ``fallback``: ``"last_math"`` (default: the last LaTeX environment, bare
   ``\\frac``/``\\sqrt`` or number, as math-verify does when nothing is marked),
   ``"last_number"``, ``"none"`` or a callable.

The other marked answers follow the winner as candidates: a scorer that cannot parse the
winner ("Answer: see above") tries them in turn.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import NamedTuple

__all__ = [
    "FALLBACKS",
    "answer_line",
    "extract_answer",
    "extract_candidates",
    "last_boxed",
    "last_math",
    "last_number",
    "normalize_answer",
]

FALLBACKS = ("last_math", "last_number", "none")

_BOX_COMMANDS = ("\\boxed", "\\fbox")
# Answers longer than this are not answers; the cap also keeps sympy away from huge inputs.
MAX_ANSWER_CHARS = 1000
# Unmarked math is looked for in this many final characters only (the answer is at the end).
TAIL_CHARS = 4000
# Parts of one multi-part answer ("\\boxed{1}, \\boxed{2}") kept at most.
MAX_PARTS = 16
# Candidates returned at most (the winner and its runners-up).
MAX_CANDIDATES = 4

_MAX_BOX_TRIES = 32
_BOX_TOKEN = re.compile(r" +([^\s$]+)")
_ANSWER_LINE = re.compile(r"(?i)answer(?:\*\*|\s)*:")
_FINAL_PHRASE = re.compile(r"(?i)final answer[^\n]{0,100}?\bis\b\s*:?")
_ANSWER_WORD = re.compile(r"(?i)\banswers?\b")
_ANSWER_WINDOW = 50
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
# Math written without delimiters: numbers (thousands separated by commas or spaces,
# decimals, percent), simple fractions a/b, and bare \frac / \sqrt.
_PLAIN_MATH = re.compile(
    r"(?<![\w.\\])-?\d*\\[dtc]?frac(?:\{[^{}\n]{1,60}\}|\d){2}"
    r"|(?<![\w.\\])-?\d*\\sqrt(?:\{[^{}\n]{1,60}\}|\d)"
    r"|(?<![\w.])-?\d+\s*/\s*\d+(?!\.?\d)"
    r"|(?<![\w.,(\[])-?\d+,\d{1,2}(?![\d,])"
    r"|(?<![\w.])-?(?:[1-9]\d{0,2}(?:,\d{3})+(?![\d])|[1-9]\d{0,2}(?: \d{3})+(?![\d])|\d+)"
    r"(?:\.\d+)?(?:\s*(?:\\?%|percent\b))?"
    r"|(?<![\w.])-?\.\d+"
)
_DECIMAL_COMMA = re.compile(r"-?\d+,\d{1,2}")
_OPENERS = re.compile(r"\$\$|\$|\\\(|\\\[")
_CLOSERS = {"$$": "$$", "$": "$", "\\(": "\\)", "\\[": "\\]"}
# What may stand between the parts of one answer: spacing, punctuation, "and"/"or", a part
# label ("(a)", "part b") and a variable name with "=" ("y_2 =").
_GAP_NOISE = re.compile(
    r"\\text(?:normal|rm|bf)?\{([^{}]*)\}|\\(?:quad|qquad|[,;:! ]|\(|\)|\[|\])|\\\\|[$,;.&:*]"
)
_GAP_WORDS = frozenset({"and", "or", "part", "parts", "for", "as", "well"})
_GAP_LABEL = re.compile(r"\(?[a-z]{1,4}\)|[a-zA-Z](?:_\{?\w{1,4}\}?)?=?|=")
_MAX_GAP = 80
_SENTENCE_END = re.compile(r"\.\s+[A-Z]|\n")
_WORD = re.compile(r"(?<![\\A-Za-z])[A-Za-z]{3,}")
_MATH_WORDS = frozenset(
    "and or the sin cos tan cot sec csc log exp sqrt max min gcd lcm mod det inf sup lim".split()
)


class Found(NamedTuple):
    """An answer located in a text: ``text[start:stop]`` holds it, ``answer`` is its value.

    ``kind`` is ``"env"`` for a math environment, ``"plain"`` for math without delimiters
    (a number, a bare ``\\frac``) and ``"marked"`` for a box or a marked answer.
    """

    start: int
    stop: int
    answer: str
    kind: str = "marked"


# --------------------------------------------------------------------------------------
# Boxes


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


def _box_before(text: str, end: int, tries: int = _MAX_BOX_TRIES) -> Found | None:
    """The last complete box that starts before ``end`` (unclosed boxes are skipped)."""
    for _ in range(tries):
        pos = max(text.rfind(cmd, 0, end) for cmd in _BOX_COMMANDS)
        if pos < 0:
            return None
        cmd = next(c for c in _BOX_COMMANDS if text.startswith(c, pos))
        j = pos + len(cmd)
        if j < len(text) and text[j] == "{":
            content = _balanced(text, j)
            if content is not None and content.strip():
                return Found(pos, j + len(content) + 2, content.strip())
        elif j < len(text) and text[j] == " ":
            token = _BOX_TOKEN.match(text, j, j + MAX_ANSWER_CHARS)
            if token:
                return Found(pos, token.end(), token.group(1))
        end = pos
    return None


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` or ``\\fbox{...}`` in ``text`` (braces balanced).

    ``\\boxed 5`` (the command, a space and one token) is accepted too. An unclosed last box
    (a truncated response) falls back to the box before it; at most ``_MAX_BOX_TRIES`` boxes
    are tried from the end. Returns None when there is no complete box.
    """
    if not isinstance(text, str):
        return None
    found = _box_before(text, len(text))
    return None if found is None else found.answer


def is_connector(gap: str) -> bool:
    """Whether ``gap`` only joins two parts of one answer (", ", " and ", ``\\quad``...)."""
    if len(gap) > _MAX_GAP:
        return False
    words = _GAP_NOISE.sub(lambda m: f" {m.group(1) or ''} ", gap).split()
    return all(w.lower() in _GAP_WORDS or _GAP_LABEL.fullmatch(w) for w in words)


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts)


def boxed_group(text: str, end: int | None = None) -> Found | None:
    """The last box before ``end`` and the boxes joined to it by connectors, as one answer.

    ``"\\boxed{1} and \\boxed{2}"`` gives ``"1, 2"``; an earlier box separated by prose is
    not part of the answer.
    """
    last = _box_before(text, len(text) if end is None else end)
    if last is None:
        return None
    parts, start = [last.answer], last.start
    while len(parts) < MAX_PARTS:
        prev = _box_before(text, start, tries=1)
        if prev is None or prev.stop > start or not is_connector(text[prev.stop : start]):
            break
        parts.insert(0, prev.answer)
        start = prev.start
    return Found(start, last.stop, _join(parts))


# --------------------------------------------------------------------------------------
# Math in running text


def _plain_value(token: str) -> str:
    """A number from running text; a comma before one or two final digits is a decimal
    comma there, as math-verify reads it (``2,74`` is 2.74; ``1,000`` is a thousand)."""
    token = token.strip()
    return token.replace(",", ".") if _DECIMAL_COMMA.fullmatch(token) else token


def _find_closer(text: str, pos: int, hi: int, closer: str, inline: bool) -> int:
    """Index of the unescaped ``closer`` at or after ``pos`` (on the same line if inline)."""
    limit = hi
    if inline:
        newline = text.find("\n", pos, hi)
        limit = hi if newline < 0 else newline
    while True:
        j = text.find(closer, pos, limit)
        if j < 0 or closer[0] != "$" or text[j - 1] != "\\":
            return j
        pos = j + 1


def math_spans(text: str, lo: int = 0, hi: int | None = None) -> list[Found]:
    """Math in ``text[lo:hi]``, left to right: ``$..$``, ``$$..$$``, ``\\(..\\)``,
    ``\\[..\\]`` environments (their inner text) and, outside them, numbers and bare
    ``\\frac``/``\\sqrt``. Inline ``$``/``\\(`` environments do not span lines; a ``$`` right
    after a digit is a currency sign, not an opener."""
    hi = len(text) if hi is None else hi
    spans: list[Found] = []
    i = lo
    while True:
        m = _OPENERS.search(text, i, hi)
        stop = hi if m is None else m.start()
        spans.extend(
            Found(n.start(), n.end(), _plain_value(n.group(0)), "plain")
            for n in _PLAIN_MATH.finditer(text, i, stop)
        )
        if m is None:
            return spans
        opener, s = m.group(0), m.start()
        i = m.end()
        if opener[0] == "$" and s > 0 and (text[s - 1] == "\\" or text[s - 1].isdigit()):
            continue
        closer = _CLOSERS[opener]
        j = _find_closer(text, i, hi, closer, inline=opener in ("$", "\\("))
        if j < 0:
            continue
        inner = text[i:j].strip()
        i = j + len(closer)
        if inner:
            spans.append(Found(s, i, inner, "env"))


def _joinable(text: str, a: Found, b: Found) -> bool:
    """Whether environments ``a`` and ``b`` (``a`` first) are parts of one answer."""
    return a.kind == b.kind == "env" and is_connector(text[a.stop : b.start])


def _group_back(text: str, spans: list[Found], k: int) -> Found:
    """``spans[k]`` joined with the environments before it that only connectors separate."""
    parts, start, stop = [spans[k].answer], spans[k].start, spans[k].stop
    while k > 0 and len(parts) < MAX_PARTS and _joinable(text, spans[k - 1], spans[k]):
        k -= 1
        parts.insert(0, spans[k].answer)
        start = spans[k].start
    return Found(start, stop, _join(parts), spans[k].kind)


def _group_forward(text: str, spans: list[Found], k: int) -> Found:
    """``spans[k]`` joined with the environments after it that only connectors separate."""
    parts, start, stop = [spans[k].answer], spans[k].start, spans[k].stop
    while k + 1 < len(spans) and len(parts) < MAX_PARTS and _joinable(text, spans[k], spans[k + 1]):
        k += 1
        parts.append(spans[k].answer)
        stop = spans[k].stop
    return Found(start, stop, _join(parts), spans[k].kind)


def _tail_start(text: str) -> int:
    """Where the last ``TAIL_CHARS`` characters begin, moved to a line start if one is near."""
    if len(text) <= TAIL_CHARS:
        return 0
    start = len(text) - TAIL_CHARS
    newline = text.find("\n", start, start + 200)
    return start if newline < 0 else newline + 1


def last_math(text: str) -> str | None:
    """The last math in ``text``: environment, bare ``\\frac``/``\\sqrt`` or number.

    Environments joined only by connectors form one answer (``"$1$ and $2$"`` gives
    ``"1, 2"``). Only the last ``TAIL_CHARS`` characters are read. None when there is none.
    """
    if not isinstance(text, str):
        return None
    spans = math_spans(text, _tail_start(text))
    if not spans:
        return None
    return _group_back(text, spans, len(spans) - 1).answer


def last_number(text: str) -> str | None:
    """The last number written in ``text`` (``-3``, ``1,000``, ``2.5``), or None."""
    if not isinstance(text, str):
        return None
    last = None
    for match in _NUMBER.finditer(text):
        last = match
    return None if last is None else last.group(0).replace(",", "")


# --------------------------------------------------------------------------------------
# Marked answers


def _reduce(content: str) -> str | None:
    """The answer inside the text that follows a marker ("Answer:", "final answer is").

    A box wins, then a nested "final answer is". Else the first sentence counts: when it
    opens with math, that math (a bare expression to the end of the sentence); when it is
    prose ("The largest $n$ is 34"), its last math; prose without math ("see above") holds
    no answer; else its text ("Evelyn"), without emphasis, quotes or a final period.
    """
    content = content[: MAX_ANSWER_CHARS + 200]
    box = boxed_group(content)
    if box is not None:
        return box.answer
    phrase = _last_match(_FINAL_PHRASE, content)
    if phrase is not None:
        return _reduce(content[phrase.end() :])
    end = _SENTENCE_END.search(content)
    sentence = content[: end.start() if end else len(content)]
    sentence = sentence.strip().strip("*\"'`").strip()
    spans = math_spans(sentence)
    if spans and spans[0].start == 0 and spans[0].kind == "env":
        return _group_forward(sentence, spans, 0).answer
    words = _prose_words(sentence)
    if spans and spans[0].start > 0 and words:
        return _group_back(sentence, spans, len(spans) - 1).answer
    if not spans and len(words) > 1:
        return None  # "see above": a remark, not an answer ("Evelyn" is one)
    return sentence.rstrip(".").strip() or None


def _prose_words(text: str) -> list[str]:
    """The words of three letters or more in ``text`` that are not math ("sin", "and")."""
    return [w for w in _WORD.findall(text) if w.lower() not in _MATH_WORDS]


def _last_match(pattern: re.Pattern[str], text: str, lo: int = 0) -> re.Match[str] | None:
    last = None
    for match in pattern.finditer(text, lo):
        last = match
    return last


def _answer_line_found(text: str) -> Found | None:
    """The last ``Answer:`` marker and its answer (rest of the line, else the next line)."""
    match = _last_match(_ANSWER_LINE, text)
    if match is None:
        return None
    rest = text[match.end() : match.end() + MAX_ANSWER_CHARS + 200]
    line, _, after = rest.partition("\n")
    if not line.strip(" \t*"):
        line = after.lstrip("\n").partition("\n")[0]
    answer = _reduce(line.strip(" \t*"))
    return None if answer is None else Found(match.start(), match.end() + len(line), answer)


def answer_line(text: str) -> str | None:
    """The answer after the last ``Answer:`` (case-insensitive; ``**Answer:**`` too).

    This is the DAPO convention ("The last line of your response should be of the form
    Answer: $Answer"). The answer is the box or math environment on that line, else the
    line's text without a final period; an empty line defers to the next one. None when
    there is no such line or it holds nothing.
    """
    if not isinstance(text, str):
        return None
    found = _answer_line_found(text)
    return None if found is None else found.answer


def _final_phrase_found(text: str) -> Found | None:
    """The last "final answer is ..." phrase and the answer it states."""
    match = _last_match(_FINAL_PHRASE, text)
    if match is None:
        return None
    answer = _reduce(text[match.end() : match.end() + MAX_ANSWER_CHARS])
    return None if answer is None else Found(match.start(), match.end(), answer)


def _answer_word_found(text: str) -> Found | None:
    """The last "answer" followed within ``_ANSWER_WINDOW`` characters by math."""
    lo = _tail_start(text)
    matches = list(_ANSWER_WORD.finditer(text, lo))
    for match in reversed(matches[-8:]):
        hi = min(len(text), match.end() + _ANSWER_WINDOW + MAX_ANSWER_CHARS)
        spans = math_spans(text, match.end(), hi)
        if spans and spans[0].start <= match.end() + _ANSWER_WINDOW:
            return _group_forward(text, spans, 0)
    return None


def marked_answers(text: str) -> list[Found]:
    """Boxes, ``Answer:`` lines and "final answer is" phrases, the last stated first."""
    found = [
        f
        for f in (boxed_group(text), _answer_line_found(text), _final_phrase_found(text))
        if f is not None
    ]
    return sorted(found, key=lambda f: f.start, reverse=True)


def extract_candidates(
    text: str, *, fallback: str | Callable[[str], str | None] = "last_math"
) -> list[str]:
    """Possible final answers of a response, the most likely first (see the module docs).

    Args:
        text: the model's response.
        fallback: what to use when nothing marks the answer: ``"last_math"``,
            ``"last_number"``, ``"none"`` or a callable ``text -> str | None``.

    Returns:
        Up to ``MAX_CANDIDATES`` distinct answer strings; empty when there is no answer
        (also for non-string input).
    """
    if not callable(fallback) and fallback not in FALLBACKS:
        raise ValueError(
            f"unknown fallback={fallback!r}; expected one of {FALLBACKS} or a callable"
        )
    if not isinstance(text, str) or not text:
        return []
    answers = [f.answer for f in marked_answers(text)]
    if not answers:
        word = _answer_word_found(text)
        if word is not None:
            answers.append(word.answer)
    if not answers:
        if callable(fallback):
            answers.append(fallback(text))
        elif fallback == "last_math":
            answers.append(last_math(text))
        elif fallback == "last_number":
            answers.append(last_number(text))
    out: list[str] = []
    for ans in answers:
        ans = ans.strip() if isinstance(ans, str) else None
        if ans and ans not in out:
            out.append(ans)
    return out[:MAX_CANDIDATES]


def extract_answer(
    text: str, *, fallback: str | Callable[[str], str | None] = "last_math"
) -> str | None:
    """The final answer of a response: the first of :func:`extract_candidates`, or None."""
    candidates = extract_candidates(text, fallback=fallback)
    return candidates[0] if candidates else None


# --------------------------------------------------------------------------------------
# Normalisation


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
