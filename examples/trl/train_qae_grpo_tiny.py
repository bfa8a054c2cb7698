"""GRPO with QAE in TRL, on the built-in arithmetic task and tiny model (CPU, no download).

    python examples/trl/train_qae_grpo_tiny.py --steps 10 --k 0.4

The advantages come from qae (``QAEGRPOTrainer``); everything else is TRL's GRPOTrainer:
generation, reward functions, loss (``loss_type="dapo"``, TRL's default), logging. The
reward is exact-match correctness of the answer (digits least-significant first).
Departure from the paper: TRL has no DAPO dynamic sampling, so all-correct and
all-wrong groups stay in the batch with zero advantage (logged as ``qae/frac_zero_adv``).
For a real model pass ``--model`` (a hub name or a path) and your own dataset code.
"""

from __future__ import annotations

import argparse

from datasets import Dataset
from trl import GRPOConfig

from qae.integrations.trl import QAEGRPOTrainer
from qae.tasks import arithmetic_score, load_tiny_model, make_split


def correct(completions: list[str], answer: list[str], **_: object) -> list[float]:
    """1.0 for an exactly right answer, else 0.0."""
    return [arithmetic_score(c, a) for c, a in zip(completions, answer, strict=True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps")
    parser.add_argument("--k", type=float, default=0.4, help="QAE quantile level K")
    parser.add_argument("--estimator", default="qae", help="qae estimator name (qae, grpo, ...)")
    parser.add_argument("--prompts", type=int, default=4, help="prompts per step")
    parser.add_argument("--generations", type=int, default=8, help="responses per prompt (G)")
    parser.add_argument("--lr", type=float, default=5e-5, help="learning rate")
    parser.add_argument("--output-dir", default="runs/trl-qae-tiny", help="TRL output dir")
    parser.add_argument("--model", default=None, help="model path or hub name (default: tiny)")
    args = parser.parse_args()

    if args.model is None:
        model, tokenizer = load_tiny_model()
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(args.model)
        tokenizer = AutoTokenizer.from_pretrained(args.model)
    n_rows = args.steps * args.prompts
    rows = make_split("train", n=n_rows, seed=0)
    dataset = Dataset.from_list([{"prompt": r["prompt"], "answer": r["answer"]} for r in rows])
    config = GRPOConfig(
        output_dir=args.output_dir,
        per_device_train_batch_size=args.prompts * args.generations,
        num_generations=args.generations,
        max_completion_length=4,
        max_steps=args.steps,
        learning_rate=args.lr,
        temperature=1.0,
        beta=0.0,
        epsilon=0.2,
        epsilon_high=0.28,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        seed=0,
    )
    trainer = QAEGRPOTrainer(
        model=model,
        reward_funcs=correct,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        qae_estimator=args.estimator,
        qae_k=args.k,
    )
    trainer.train()
    for row in trainer.state.log_history:
        if "qae/k" in row:
            print(
                f"step {row['step']:>3}  reward {row['reward']:.3f}  "
                f"K {row['qae/k']:.2f}  zero-adv {row['qae/frac_zero_adv']:.2f}  "
                f"entropy {row.get('entropy', float('nan')):.3f}"
            )


if __name__ == "__main__":
    main()
