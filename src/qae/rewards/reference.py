"""Reference answers as text: a data set's ground truth as the answer a response must give.

A ground truth arrives as a number (``27.0``), a LaTeX answer (``\\boxed{3}``, ``$5$``) or a
worked solution ending in GSM8K's ``#### 1,000``; :func:`ground_truth_text` turns each into
plain answer text. The prompt datasets store every reference answer that way
(:class:`qae.eval.datasets.PromptRecord`), and the math reward reads a ground truth it is
given through it, so a verl or TRL data set's raw value scores the same.
"""

from __future__ import annotations

import math

from qae.rewards.extract import _group_back, _tail_start, boxed_group, math_spans

__all__ = ["ground_truth_text"]


def ground_truth_text(ground_truth: object) -> str:
    """A ground truth as answer text: ints and integral floats without ``.0``, strings stripped.

    ``27.0 -> "27"``, ``7 -> "7"``, ``0.5 -> "0.5"``, ``"\\boxed{3}" -> "3"``,
    ``"$5$" -> "5"``, ``"$1$ and $2$" -> "1, 2"``, GSM8K-style ``"... #### 1,000" -> "1000"``.
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
        return text.rsplit("####", 1)[1].strip().replace(",", "")
    box = boxed_group(text)
    if box is not None:
        return box.answer
    if _has_delimiters(text):
        envs = [s for s in math_spans(text, _tail_start(text)) if s.kind == "env"]
        if envs:
            return _group_back(text, envs, len(envs) - 1).answer
    return text


def _has_delimiters(text: str) -> bool:
    plain = text.replace("\\$", "")
    return "$" in plain or "\\(" in plain or "\\[" in plain
