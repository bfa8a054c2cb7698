"""Update-phase time with and without skipping zero-advantage responses, in one run.

Two settings:
- ``embedded``: the arithmetic preset (shipped tiny model, built-in task, 16 prompts x 8
  samples, real rollouts and rewards); tiny and overhead-bound.
- ``compute``: a randomly initialised 4-layer Qwen2 (hidden 384, 13M parameters) on 128
  responses of 64 tokens with binary rewards drawn per group, where the forward/backward
  dominates.

For each: the zero-advantage fraction of QAE (K=0.4) and of the mean baseline, and the
update time (forward + backward of one mini-batch, no optimizer step) with skipping off,
skipping on with full-batch metrics (a no-grad forward over skipped rows), and skipping on
with metrics over updated rows only.

    python benchmarks/bench_sparse_update.py [--repeats 5] [--settings embedded,compute]
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from qae.core.advantages import compute_advantages
from qae.io.configtools import apply_overrides
from qae.train.config import load_preset
from qae.train.rollout import Batch, generate_batch
from qae.train.trainer import load_policy, score_batch
from qae.train.update import accumulate_gradients, active_rows, batch_logprobs, scatter_rows


def embedded_batch():
    from qae.rewards import get_reward
    from qae.tasks import iter_train
    from qae.tasks.tiny_model import MAX_NEW_TOKENS

    model, tok = load_policy("builtin", torch.device("cpu"))
    stream = iter_train(0)
    records = [next(stream) for _ in range(16)]
    batch = generate_batch(
        model,
        tok,
        [r["prompt"] for r in records],
        [r["answer"] for r in records],
        group_size=8,
        temperature=1.0,
        max_new_tokens=MAX_NEW_TOKENS,
    )
    return model, score_batch(batch, get_reward("arithmetic")), 64


def compute_batch():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        vocab_size=512,
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=512,
    )
    model = Qwen2ForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(0)
    p, group = 16, 8
    prompts = [torch.randint(1, 512, (32,), generator=g).tolist() for _ in range(p)]
    b = p * group
    success = torch.rand(p, generator=g)
    rewards = (torch.rand(p, group, generator=g) < success[:, None]).float().flatten()
    batch = Batch(
        prompt_ids=[prompts[i // group] for i in range(b)],
        response_ids=[torch.randint(1, 512, (64,), generator=g).tolist() for _ in range(b)],
        group_ids=torch.arange(p).repeat_interleave(group),
        scores=rewards,
        rewards=rewards.clone(),
        truncated=torch.zeros(b, dtype=torch.bool),
        loss_rows=torch.ones(b, dtype=torch.bool),
    )
    return model, batch, 16


def time_update(model, batch, adv, cfg, skip, full_metrics, repeats) -> float:
    rows = list(range(len(batch)))
    best = float("inf")
    for _ in range(repeats):
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        if skip and full_metrics:  # what the trainer does for the skipped rows' metrics
            active = set(active_rows(batch, rows, adv, True))
            rest = [i for i in rows if i not in active]
            if rest:
                scatter_rows(
                    batch_logprobs(model, batch, rest, 0, cfg, torch.device("cpu")),
                    rest,
                    len(batch),
                )
        accumulate_gradients(
            model,
            batch,
            rows,
            adv,
            None,
            None,
            0,
            cfg,
            torch.device("cpu"),
            torch.Generator().manual_seed(0),
            skip=skip,
        )
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--settings", default="embedded,compute")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(
        f"# torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{platform.machine()}; best of {args.repeats}"
    )
    print(
        "| setting | estimator | B | zero-adv | full (s) | skip+metrics (s) | skip (s) "
        "| speedup skip+metrics | speedup skip |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    makers = {"embedded": embedded_batch, "compute": compute_batch}
    for name in args.settings.split(","):
        model, batch, micro = makers[name]()
        cfg = apply_overrides(load_preset("arithmetic"), {"trainer.micro_batch_size": micro})
        for est in ("qae", "grpo"):
            adv = compute_advantages(batch.rewards, batch.group_ids, est, k=0.4)
            zero = float((adv == 0).float().mean())
            full = time_update(model, batch, adv, cfg, False, False, args.repeats)
            skip_m = time_update(model, batch, adv, cfg, True, True, args.repeats)
            skip = time_update(model, batch, adv, cfg, True, False, args.repeats)
            print(
                f"| {name} | {est} | {len(batch)} | {zero:.2f} | {full:.3f} | {skip_m:.3f} | "
                f"{skip:.3f} | {full / skip_m:.2f}x | {full / skip:.2f}x |",
                flush=True,
            )


if __name__ == "__main__":
    main()
