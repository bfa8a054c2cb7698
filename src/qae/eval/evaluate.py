"""Sampling evaluation of a causal LM on math benchmarks: :func:`evaluate`.

For every problem, n responses are sampled (Hugging Face ``model.generate``) and scored with
a reward function (``"math"`` by default) through :mod:`qae.eval.sampling`, then summarised
per benchmark with pass@k, mean@n and maj@n (:mod:`qae.eval.metrics`).

Files written to ``out_dir``: ``config.json`` (what was run), ``samples.jsonl`` (one line per
sample, appended one problem at a time and flushed) and ``summary.json`` (replaced
atomically). Running again with the same ``out_dir`` skips the problems already in
``samples.jsonl``.
"""

from __future__ import annotations

import json
import os
import zlib
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from qae.eval.datasets import PromptRecord
from qae.eval.metrics import summarize
from qae.eval.prompts import build_prompt, prompt_templates
from qae.eval.sampling import generate_texts, generation_mode, score_responses
from qae.io.atomic import atomic_write_json
from qae.io.threads import ThreadPolicy
from qae.rewards import DEFAULT_TIMEOUT, extract_answer, get_reward

__all__ = ["CONFIG_FILE", "SAMPLES_FILE", "SUMMARY_FILE", "evaluate"]

SAMPLES_FILE = "samples.jsonl"
SUMMARY_FILE = "summary.json"
CONFIG_FILE = "config.json"
# Settings that change the samples: resuming with different values would mix two runs.
_RESUME_KEYS = ("n", "temperature", "top_p", "max_new_tokens", "template", "reward", "seed")


# --------------------------------------------------------------------------------------
# Output files


def _read_samples(path: Path) -> list[dict[str, Any]]:
    """Rows of ``samples.jsonl``; a torn last line (a crash mid-write) is cut off the file."""
    if not path.exists():
        return []
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with path.open("r+b") as fh:
            fh.truncate(end)
    rows = []
    for line in data[:end].splitlines():
        if line.strip():
            rows.append(json.loads(line))
    return rows


def _reward_name(reward: str | Callable) -> str:
    if isinstance(reward, str):
        return reward
    return f"{getattr(reward, '__module__', '?')}.{getattr(reward, '__qualname__', repr(reward))}"


def _check_resume(out: Path, config: dict[str, Any]) -> None:
    path = out / CONFIG_FILE
    if path.exists():
        old = json.loads(path.read_text(encoding="utf-8"))
        for key in _RESUME_KEYS:
            if key in old and old[key] != config[key]:
                raise ValueError(
                    f"{out} holds an evaluation with {key}={old[key]!r}, not {config[key]!r}; "
                    "use another output directory to start a new evaluation"
                )
    atomic_write_json(path, config, indent=2, sort_keys=True)


# --------------------------------------------------------------------------------------
# Generation


def _generate(
    model: Any,
    tokenizer: Any,
    prompts: list[tuple[str, bool]],
    *,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    seed: int,
) -> list[str]:
    import torch

    torch.manual_seed(seed)
    return generate_texts(
        model,
        tokenizer,
        [p for p, _ in prompts],
        temperature=temperature,
        top_p=top_p,
        max_new_tokens=max_new_tokens,
        add_special_tokens=not all(t for _, t in prompts),
    )


def _batch_seed(seed: int, record: PromptRecord, sample: int) -> int:
    # Derived from the batch's first (problem, sample), not its position, so that a resumed
    # run seeds a batch that starts at the same sample the same way.
    tag = zlib.crc32(f"{record.source}\0{record.id}".encode())
    return (seed * 1_000_003 + tag * 4099 + sample) % (2**63)


def _check_args(n: int, ks: Sequence[int], temperature: float, top_p: float, batch_size: int):
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got n={n!r}")
    if not ks:
        raise ValueError("ks must name at least one k")
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
            raise ValueError(f"every k must be an integer in [1, n={n}], got k={k!r}")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0, got temperature={temperature!r}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got top_p={top_p!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got batch_size={batch_size!r}")


def _resume(
    out: Path | None, config: dict[str, Any], records: Sequence[PromptRecord], n: int
) -> tuple[list[dict[str, Any]], list[PromptRecord]]:
    """``(rows already in out's samples file, records still to sample)``: a record is done
    when all its ``n`` samples are there. Creates ``out``; a different config raises."""
    rows: list[dict[str, Any]] = []
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        _check_resume(out, config)
        rows = _read_samples(out / SAMPLES_FILE)
    done_samples: dict[tuple[str, str], set[int]] = defaultdict(set)
    for row in rows:
        done_samples[(row["source"], str(row["problem_id"]))].add(int(row["sample"]))
    finished = {key for key, got in done_samples.items() if got >= set(range(n))}
    return rows, [r for r in records if (r.source, r.id) not in finished]


def _append_rows(sink: Any, rows: Sequence[dict[str, Any]]) -> None:
    """Append JSON lines and make them durable before going on (a kill loses no scored row)."""
    sink.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    sink.flush()
    os.fsync(sink.fileno())


def evaluate(
    model: Any,
    tokenizer: Any,
    records: Sequence[PromptRecord],
    *,
    n: int = 32,
    temperature: float = 0.7,
    top_p: float = 1.0,
    max_new_tokens: int = 1024,
    ks: Sequence[int] = (1, 16),
    reward: str | Callable = "math",
    out_dir: str | os.PathLike[str] | None = None,
    batch_size: int = 32,
    seed: int = 0,
    template: str = "dapo",
    workers: int | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    progress: bool = True,
    threads: int | None = None,
) -> dict[str, Any]:
    """Sample ``n`` responses per record, score them and summarise pass@k / mean@n / maj@n.

    Args:
        model: a Hugging Face causal LM (anything with ``generate`` and ``parameters``).
        tokenizer: its tokenizer; its padding side is set to left while generating.
        records: problems with reference answers (:func:`qae.eval.datasets.load_prompts`).
        n: samples per problem.
        temperature: sampling temperature; 0 means greedy.
        top_p: nucleus sampling threshold (1.0 disables it; top-k is always off).
        max_new_tokens: generation length limit per response.
        ks: the k values of pass@k, each in [1, n].
        reward: registered reward name or a callable ``fn(response, ground_truth)``.
        out_dir: folder for ``config.json``, ``samples.jsonl`` and ``summary.json``; problems
            already complete in it are not generated again. None keeps everything in memory.
        batch_size: sequences per ``generate`` call.
        seed: base seed; each ``generate`` call seeds torch with a value derived from it and
            from its first (problem, sample).
        template: prompt template name (``dapo``, ``boxed``, ``raw``) for records without
            chat messages.
        workers, timeout: passed to :func:`qae.rewards.score_batch`.
        progress: show a tqdm bar over samples.
        threads: torch CPU threads: None leaves torch's setting alone, 0 picks them from
            the machine's load before every ``generate`` call, N > 0 fixes them
            (:class:`qae.io.threads.ThreadPolicy`).

    Returns:
        ``{"benchmarks": {source: metrics}, "config": {...}}`` (see :func:`summarize`).
    """
    from tqdm.auto import tqdm

    _check_args(n, ks, temperature, top_p, batch_size)
    prompt_templates.get(template)
    reward_fn = get_reward(reward)
    _check_bounds(model, tokenizer, records, template, max_new_tokens)
    config = {
        "n": n,
        "temperature": temperature,
        "top_p": top_p,
        "max_new_tokens": max_new_tokens,
        "template": template,
        "reward": _reward_name(reward),
        "seed": seed,
        "ks": list(ks),
        "batch_size": batch_size,
    }
    out = Path(out_dir) if out_dir is not None else None
    rows, pending = _resume(out, config, records, n)
    jobs = [(i, s) for i in range(len(pending)) for s in range(n)]  # (problem, sample)
    prompts = {}
    buffers: dict[int, dict[int, str]] = defaultdict(dict)
    sink = (out / SAMPLES_FILE).open("a", encoding="utf-8") if out is not None else None
    bar = tqdm(total=len(jobs), desc="eval", unit="sample", disable=not progress)
    policy = ThreadPolicy(threads) if threads is not None else None
    try:
        with generation_mode(model, tokenizer):
            for start in range(0, len(jobs), batch_size):
                if policy is not None:
                    policy.update()
                batch = jobs[start : start + batch_size]
                for i, _ in batch:
                    if i not in prompts:
                        prompts[i] = build_prompt(pending[i], tokenizer, template)
                first_i, first_s = batch[0]
                texts = _generate(
                    model,
                    tokenizer,
                    [prompts[i] for i, _ in batch],
                    temperature=temperature,
                    top_p=top_p,
                    max_new_tokens=max_new_tokens,
                    seed=_batch_seed(seed, pending[first_i], first_s),
                )
                for (i, s), text in zip(batch, texts, strict=True):
                    buffers[i][s] = text
                complete = [i for i in sorted({i for i, _ in batch}) if len(buffers[i]) == n]
                new_rows = _score_problems(
                    [pending[i] for i in complete],
                    [[buffers[i][s] for s in range(n)] for i in complete],
                    reward_fn,
                    workers=workers,
                    timeout=timeout,
                )
                for i in complete:
                    del buffers[i]
                    prompts.pop(i, None)
                if sink is not None and new_rows:
                    _append_rows(sink, new_rows)
                rows.extend(new_rows)
                bar.update(len(batch))
    finally:
        bar.close()
        if sink is not None:
            sink.close()

    wanted = {(r.source, r.id) for r in records}
    kept = [r for r in rows if (r["source"], str(r["problem_id"])) in wanted]
    summary = {"benchmarks": summarize(kept, n=n, ks=list(ks)), "config": config}
    if out is not None:
        atomic_write_json(out / SUMMARY_FILE, summary, indent=2, sort_keys=True)
    return summary


def _check_bounds(
    model: Any,
    tokenizer: Any,
    records: Sequence[PromptRecord],
    template: str,
    max_new_tokens: int,
) -> None:
    """``max_new_tokens`` and every record's prompt must fit the model's context (a model
    whose config names no context length is not checked)."""
    from qae.eval.bounds import check_prompt_lengths, check_response_budget, context_length

    context = context_length(model)
    if context is None:
        return
    budget = f"max_new_tokens={max_new_tokens}"
    limit = check_response_budget(max_new_tokens, context, budget=budget)
    rows: dict[str, int] = defaultdict(int)
    for record in records:
        row = rows[record.source]
        rows[record.source] += 1
        text, templated = build_prompt(record, tokenizer, template)
        check_prompt_lengths(
            [(f"{record.source} row {row} (id {record.id!r})", text)],
            tokenizer,
            limit=limit,
            context=context,
            budget=budget,
            add_special_tokens=not templated,
        )


def _score_problems(
    problems: Sequence[PromptRecord],
    responses: Sequence[Sequence[str]],
    reward_fn: Callable,
    *,
    workers: int | None,
    timeout: float,
) -> list[dict[str, Any]]:
    flat = [
        (p, s, text)
        for p, texts in zip(problems, responses, strict=True)
        for s, text in enumerate(texts)
    ]
    if not flat:
        return []
    per_problem = score_responses(
        reward_fn, responses, [p.answer for p in problems], workers=workers, timeout=timeout
    )
    scores = [score for row in per_problem for score in row]
    # A reward function may say how to read a response's answer (``fn.extract``).
    extract = getattr(reward_fn, "extract", extract_answer)
    return [
        {
            "source": p.source,
            "problem_id": p.id,
            "sample": s,
            "response": text,
            "answer": extract(text),
            "ground_truth": p.answer,
            "score": score,
        }
        for (p, s, text), score in zip(flat, scores, strict=True)
    ]
