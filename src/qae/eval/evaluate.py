"""Sampling evaluation of a causal LM on math benchmarks: pass@k, mean@n, maj@n, ``qae eval``.

For every problem, n responses are sampled (Hugging Face ``model.generate``), scored with a
reward function (``"math"`` by default) and summarised per benchmark:

- pass@k: the unbiased estimator of Chen et al. 2021 ("Evaluating Large Language Models
  Trained on Code", arXiv 2107.03374), ``1 - C(n-c, k) / C(n, k)`` with c correct samples
  out of n, averaged over problems;
- mean@n: the mean score over all samples (pass@1 for 0/1 rewards);
- maj@n: the score of the most frequent normalised answer (majority vote).

Files written to ``out_dir``: ``config.json`` (what was run), ``samples.jsonl`` (one line per
sample, appended one problem at a time and flushed) and ``summary.json`` (replaced
atomically). Running again with the same ``out_dir`` skips the problems already in
``samples.jsonl``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import zlib
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from qae.core.registry import Registry
from qae.eval.datasets import PromptRecord
from qae.io.atomic import atomic_write_json
from qae.rewards import DEFAULT_TIMEOUT, extract_answer, get_reward, normalize_answer, score_batch

__all__ = [
    "add_eval_parser",
    "build_prompt",
    "evaluate",
    "format_table",
    "majority_vote",
    "pass_at_k",
    "prompt_templates",
    "register_template",
    "summarize",
]

SAMPLES_FILE = "samples.jsonl"
SUMMARY_FILE = "summary.json"
CONFIG_FILE = "config.json"
# Settings that change the samples: resuming with different values would mix two runs.
_RESUME_KEYS = ("n", "temperature", "top_p", "max_new_tokens", "template", "reward", "seed")


# --------------------------------------------------------------------------------------
# Metrics


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``c`` correct out of ``n`` samples: ``1 - C(n-c, k) / C(n, k)``.

    Computed as ``1 - prod_{i=n-c+1}^{n} (1 - k / i)``, which never forms the binomials (they
    overflow floats for n in the hundreds). Requires ``0 <= c <= n`` and ``1 <= k <= n``.
    """
    for name, value in (("n", n), ("c", c), ("k", k)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an integer, got {name}={value!r}")
    if not 0 <= c <= n:
        raise ValueError(f"c must be in [0, n={n}], got c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, n={n}], got k={k}")
    if n - c < k:
        return 1.0  # every k-subset holds a correct sample
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def _correct(score: float | None) -> bool:
    return score is not None and score > 0


def majority_vote(answers: Sequence[str | None], scores: Sequence[float | None]) -> float:
    """Score of the majority answer: the most frequent normalised answer (ties: first seen).

    Samples without an answer do not vote; 0.0 when none has an answer. The majority's score
    is that of its first sample (all samples with the same answer score alike for an
    answer-based reward).
    """
    if len(answers) != len(scores):
        raise ValueError(f"answers and scores differ in length: {len(answers)} != {len(scores)}")
    keys = [normalize_answer(a) for a in answers]
    counts = Counter(k for k in keys if k is not None)
    if not counts:
        return 0.0
    best = max(counts.values())
    winner = next(k for k in keys if k is not None and counts[k] == best)
    score = scores[keys.index(winner)]
    return 0.0 if score is None else float(score)


def summarize(samples: Iterable[Mapping[str, Any]], *, n: int, ks: Sequence[int]) -> dict:
    """Per-benchmark metrics from sample rows (``source``, ``problem_id``, ``answer``, ``score``).

    Returns ``{source: {"problems", "samples", "pass@k"..., "mean@n", "maj@n", "no_answer",
    "unscorable"}}``; only problems with all n samples count.
    """
    groups: dict[str, dict[str, dict[int, Mapping[str, Any]]]] = defaultdict(dict)
    for row in samples:
        groups[row["source"]].setdefault(str(row["problem_id"]), {})[int(row["sample"])] = row
    out: dict[str, dict[str, float | int]] = {}
    for source in sorted(groups):
        problems = [g for g in groups[source].values() if len(g) == n]
        if not problems:
            continue
        metrics: dict[str, float | int] = {"problems": len(problems), "samples": n}
        rows = [[g[i] for i in range(n)] for g in problems]
        correct = [sum(_correct(r["score"]) for r in p) for p in rows]
        for k in ks:
            metrics[f"pass@{k}"] = sum(pass_at_k(n, c, k) for c in correct) / len(rows)
        all_scores = [r["score"] for p in rows for r in p]
        metrics[f"mean@{n}"] = sum(s or 0.0 for s in all_scores) / len(all_scores)
        metrics[f"maj@{n}"] = sum(
            majority_vote([r["answer"] for r in p], [r["score"] for r in p]) for p in rows
        ) / len(rows)
        metrics["no_answer"] = sum(r["answer"] is None for p in rows for r in p) / len(all_scores)
        metrics["unscorable"] = sum(s is None for s in all_scores)
        out[source] = metrics
    return out


def format_table(summary: Mapping[str, Any]) -> str:
    """A plain-text table of a :func:`summarize` result (one row per benchmark)."""
    benches = summary.get("benchmarks", summary)
    if not benches:
        return "(no finished problems)"
    metric_keys = [
        k
        for k in next(iter(benches.values()))
        if "@" in k and not k.startswith(("problems", "samples"))
    ]
    header = f"{'benchmark':<12} {'problems':>8} " + " ".join(f"{k:>9}" for k in metric_keys)
    lines = [header, "-" * len(header)]
    for name, m in benches.items():
        cells = " ".join(f"{100 * m[k]:>8.2f}%" for k in metric_keys)
        lines.append(f"{name:<12} {m['problems']:>8} {cells}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# Prompt templates

prompt_templates: Registry[Callable[[str], str]] = Registry("prompt template", "template")


def register_template(name: str) -> Callable[[Callable[[str], str]], Callable[[str], str]]:
    """Decorator: register ``fn(problem) -> user message`` as a prompt template."""
    return prompt_templates.decorator(name)


@register_template("dapo")
def _dapo(problem: str) -> str:
    # The DAPO math prompt: the answer goes on a final "Answer:" line.
    return (
        "Solve the following math problem step by step. The last line of your response "
        "should be of the form Answer: $Answer (without quotes) where $Answer is the answer "
        f"to the problem.\n\n{problem}\n\n"
        'Remember to put your answer on its own line after "Answer:".'
    )


@register_template("boxed")
def _boxed(problem: str) -> str:
    return f"{problem}\nPlease reason step by step, and put your final answer within \\boxed{{}}."


@register_template("raw")
def _raw(problem: str) -> str:
    return problem


def build_prompt(record: PromptRecord, tokenizer: Any, template: str) -> tuple[str, bool]:
    """The prompt text for ``record`` and whether it already holds the special tokens.

    Records with chat messages use them as they are; others get ``template`` applied to the
    problem as one user message. With a chat template on the tokenizer the messages go
    through it (with the generation prompt); without one the message contents are joined.
    """
    if record.messages is not None:
        messages = [dict(m) for m in record.messages]
    else:
        messages = [{"role": "user", "content": prompt_templates.get(template)(record.problem)}]
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return text, True
    return "\n\n".join(m["content"] for m in messages), False


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

    device = next(model.parameters()).device
    templated = all(t for _, t in prompts)
    enc = tokenizer(
        [p for p, _ in prompts],
        return_tensors="pt",
        padding=True,
        add_special_tokens=not templated,
    ).to(device)
    kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens}
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
    else:
        kwargs.update(do_sample=False)
    torch.manual_seed(seed)
    with torch.inference_mode():
        out = model.generate(
            **enc,
            **kwargs,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    new_tokens = out[:, enc["input_ids"].shape[1] :]  # [B, T]
    return tokenizer.batch_decode(new_tokens, skip_special_tokens=True)


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


@contextlib.contextmanager
def _generation_mode(model: Any, tokenizer: Any) -> Iterator[None]:
    """Left padding (with the end token as pad if the tokenizer has none) and eval mode
    while sampling; both restored afterwards."""
    old_side, old_pad = tokenizer.padding_side, tokenizer.pad_token
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        yield
    finally:
        tokenizer.padding_side, tokenizer.pad_token = old_side, old_pad
        if was_training:
            model.train()


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
    try:
        with _generation_mode(model, tokenizer):
            for start in range(0, len(jobs), batch_size):
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
    scores = score_batch(
        reward_fn,
        [text for _, _, text in flat],
        [p.answer for p, _, _ in flat],
        workers=workers,
        timeout=timeout,
    )
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


# --------------------------------------------------------------------------------------
# Command line


def _parse_ks(text: str) -> list[int]:
    try:
        ks = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--k expects integers like 1,16; got {text!r}") from None
    if not ks:
        raise argparse.ArgumentTypeError(f"--k expects integers like 1,16; got {text!r}")
    return ks


def _auto_settings(args: argparse.Namespace, sources: Sequence[str]) -> tuple[str, str, int]:
    """``(reward, template, max_new_tokens)`` with each ``auto`` resolved: a built-in task's
    verifier, the raw template and its length limit when every source is that task;
    ``math``, ``dapo`` and 1024 otherwise."""
    from qae.tasks.builtin import builtin_task, is_builtin

    builtin = [builtin_task(s, field="--data") for s in sources if is_builtin(s)]
    one_task = len({t.name for t in builtin}) == 1 and len(builtin) == len(sources)
    task = builtin[0] if one_task else None
    if task is None and builtin and "auto" in (args.reward, args.template):
        raise ValueError(
            f"--data {args.data!r} mixes a built-in task with other sources: name --reward "
            "and --template explicitly"
        )
    reward = args.reward if args.reward != "auto" else (task.reward if task else "math")
    template = args.template if args.template != "auto" else ("raw" if task else "dapo")
    max_new = args.max_new_tokens or (task.max_new_tokens if task else 1024)
    return reward, template, max_new


def _load_model(name: str, device: str, dtype: Any) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of ``--model``: a local directory, a hub id or a built-in task's
    base policy; one that cannot be loaded raises ``ValueError`` in one line."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qae.tasks.builtin import builtin_task, is_builtin

    path = str(builtin_task(name, field="--model").model_path()) if is_builtin(name) else name
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError, KeyError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        shown = name if path == name else f"{name} ({path})"
        raise ValueError(
            f"--model {shown!r} could not be loaded as a causal LM (a local directory with "
            f"config.json and weights, a hub id reachable from here, or builtin[:task]): {first}"
        ) from None
    return model.to(device), tokenizer


def _check_flags(args: argparse.Namespace) -> None:
    """Reject flags that cannot work before anything is loaded, naming the flags."""
    if args.n < 1:
        raise ValueError(f"--n must be >= 1 (samples per problem), got --n {args.n}")
    if args.k is None:
        args.k = sorted({1, min(16, args.n)})
    bad = [k for k in args.k if not 1 <= k <= args.n]
    if bad:
        raise ValueError(
            f"--k {','.join(map(str, args.k))} asks for pass@{bad[0]} from --n {args.n} "
            f"samples per problem: every k must be in [1, n]; raise --n or lower --k"
        )
    if args.limit is not None and args.limit < 0:
        raise ValueError(f"--limit must be >= 0, got --limit {args.limit}")
    _check_args(args.n, args.k, args.temperature, args.top_p, args.batch_size)


def _default_out(now: float | None = None) -> str:
    """The output folder of a ``qae eval`` without ``--out``: ``runs/eval-<date>-<time>``."""
    import time

    return time.strftime("runs/eval-%Y%m%d-%H%M%S", time.localtime(now))


def _run_eval(args: argparse.Namespace) -> int:
    """``qae eval``: check the flags, load the data and the model, evaluate, print the table."""
    import torch

    from qae.eval.datasets import load_prompts
    from qae.tasks.builtin import builtin_records, is_builtin

    _check_flags(args)
    if not args.out:
        args.out = _default_out()
    print(f"qae eval: writing to {args.out} (the same --out resumes this evaluation)", flush=True)
    records: list[PromptRecord] = []
    sources = [s.strip() for s in args.data.split(",") if s.strip()]
    for source in sources:
        if is_builtin(source):
            records.extend(builtin_records(source, "validation", field="--data")[: args.limit])
            continue
        records.extend(
            load_prompts(
                source,
                split=args.split,
                problem_key=args.problem_key,
                answer_key=args.answer_key,
                data_dir=args.data_dir,
                limit=args.limit,
            )
        )
    if not records:
        raise ValueError(f"--data {args.data!r} holds no problems")
    reward, template, max_new_tokens = _auto_settings(args, sources)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {
        "auto": "auto",
        "float32": torch.float32,
        "bfloat16": torch.bfloat16,
        "float16": torch.float16,
    }[args.dtype]
    model, tokenizer = _load_model(args.model, device, dtype)
    summary = evaluate(
        model,
        tokenizer,
        records,
        n=args.n,
        temperature=args.temperature,
        top_p=args.top_p,
        max_new_tokens=max_new_tokens,
        ks=args.k,
        reward=reward,
        out_dir=args.out,
        batch_size=args.batch_size,
        seed=args.seed,
        template=template,
        workers=args.workers,
        timeout=args.timeout,
        progress=not args.no_progress,
    )
    print(format_table(summary))
    print(f"samples: {Path(args.out) / SAMPLES_FILE}\nsummary: {Path(args.out) / SUMMARY_FILE}")
    return 0


def add_eval_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``eval`` sub-command to ``subparsers`` (from ``add_subparsers``)."""
    p = subparsers.add_parser(
        "eval",
        help="sample n responses per problem and report pass@k, mean@n, maj@n",
        description="Evaluate a causal LM on math benchmarks: n samples per problem, scored "
        "by a verifiable reward. Writes samples.jsonl and summary.json to --out and resumes "
        "an interrupted run in the same folder.",
    )
    p.add_argument(
        "--model",
        required=True,
        help="local path, Hugging Face model id, or a built-in task's base policy "
        "(builtin, builtin:arithmetic, builtin:reasoning)",
    )
    p.add_argument(
        "--data",
        required=True,
        help="comma-separated benchmark names (aime24, aime25, amc23, math500, gsm8k: shipped "
        "with qae, no network needed), .jsonl/.parquet files, hub dataset ids, or a built-in "
        "task's validation split (builtin:arithmetic, builtin:reasoning)",
    )
    p.add_argument(
        "--data-dir",
        default=None,
        help="folder searched for <benchmark>.jsonl before the copy shipped with qae",
    )
    p.add_argument("--split", default=None, help="dataset split for hub sources")
    p.add_argument("--problem-key", default=None, help="field holding the problem")
    p.add_argument("--answer-key", default=None, help="field holding the answer (dots allowed)")
    p.add_argument("--limit", type=int, default=None, help="first N problems of each source")
    p.add_argument("--n", type=int, default=32, help="samples per problem")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold")
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=0,
        help="response length limit (0: a built-in task's own, else 1024)",
    )
    p.add_argument(
        "--k",
        type=_parse_ks,
        default=None,
        help="pass@k values, e.g. 1,16 (default: 1 and min(16, n))",
    )
    p.add_argument(
        "--template",
        default="auto",
        choices=["auto", *prompt_templates.names()],
        help="prompt template for problems stored as plain text (auto: raw for a built-in "
        "task, else dapo)",
    )
    p.add_argument(
        "--reward",
        default="auto",
        help="registered reward function name (auto: a built-in task's verifier, else math)",
    )
    p.add_argument(
        "--out",
        default=None,
        help="output folder, resumed if it holds the same evaluation (default: "
        "runs/eval-<date>-<time>, printed at the start)",
    )
    p.add_argument("--batch-size", type=int, default=32, help="sequences per generate call")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--workers", type=int, default=None, help="scoring processes (0: in-process)")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds per score")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "float32", "bfloat16", "float16"),
        help="model weights dtype",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=_run_eval)
    return p
