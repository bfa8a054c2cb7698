"""Cost of measuring the sampling entropy while generating (``rollout/entropy``).

Claim measured: recording, at every generated token, the entropy of each row's sampling
distribution (``qae.train.rollout.generate_batch(measure_entropy=True)``, one softmax over the
vocabulary per token) adds a small fraction to Hugging Face ``generate``.

Two settings, each timed with and without the recorder, interleaved, best and median of
``--repeats``:

- ``embedded``: the shipped tiny model and the built-in task's prompts, 16 prompts x 8
  samples, at most 4 new tokens (one generation round of the arithmetic preset).
- ``vocab152k``: a randomly initialized 2-layer Qwen2 (hidden 64) with Qwen's 151,936-token
  vocabulary, the same prompts, 16 x 8 samples of exactly 16 new tokens: the softmax over a
  real model's vocabulary, where the recorder costs the most relative to a small network.

Usage::

    python benchmarks/bench_rollout_entropy.py            # 1 torch thread, 7 repeats
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from qae.tasks import iter_train
from qae.tasks.tiny_model import load_tiny_model
from qae.train.rollout import _EntropyRecorder


def _generate(model, ids, attn, *, new_tokens: int, recorder, eos) -> None:
    kwargs = dict(
        max_new_tokens=new_tokens,
        do_sample=True,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        num_return_sequences=8,
        pad_token_id=0,
        eos_token_id=eos,
    )
    if new_tokens > 4:
        kwargs["min_new_tokens"] = new_tokens
    if recorder is not None:
        kwargs["logits_processor"] = [recorder]
    with torch.no_grad():
        model.generate(input_ids=ids, attention_mask=attn, **kwargs)


def _time(fn, repeats: int) -> tuple[list[float], list[float]]:
    off, on = [], []
    for _ in range(repeats):
        for use, out in ((False, off), (True, on)):
            t0 = time.perf_counter()
            fn(use)
            out.append(time.perf_counter() - t0)
    return off, on


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model, tok = load_tiny_model()[:2]
    records = [r for _, r in zip(range(16), iter_train(seed=0), strict=False)]
    encoded = [tok(r["prompt"], add_special_tokens=False)["input_ids"] for r in records]
    width = max(len(x) for x in encoded)
    ids = torch.zeros(len(encoded), width, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for i, x in enumerate(encoded):  # left padding
        ids[i, width - len(x) :] = torch.tensor(x)
        attn[i, width - len(x) :] = 1

    from transformers import Qwen2Config, Qwen2ForCausalLM

    big = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=151936,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            tie_word_embeddings=True,
        )
    ).eval()
    settings = {
        "embedded": (model, 4, tok.eos_token_id),
        "vocab152k": (big, 16, None),
    }
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{args.threads} thread(s), {args.repeats} repeats")  # fmt: skip
    print("| setting | generate ms (off) | generate ms (on) | median on / off | best on / off |")
    print("|---|---:|---:|---:|---:|")
    for name, (m, new_tokens, eos) in settings.items():

        def run(use: bool, m=m, new_tokens=new_tokens, eos=eos) -> None:
            rec = _EntropyRecorder(1.0) if use else None
            _generate(m, ids, attn, new_tokens=new_tokens, recorder=rec, eos=eos)

        run(False), run(True)  # warm-up
        off, on = _time(run, args.repeats)
        med_off, med_on = statistics.median(off), statistics.median(on)
        print(
            f"| {name} | {1e3 * med_off:.1f} | {1e3 * med_on:.1f} | "
            f"{med_on / med_off:.3f} | {min(on) / min(off):.3f} |"
        )


if __name__ == "__main__":
    main()
