"""`qae train` flags of a tiny run on the fast arithmetic preset, shared by CLI tests."""

TINY_TRAIN = [
    "--config",
    "arithmetic",
    "--rollout.prompts_per_step",
    "4",
    "--rollout.group_size",
    "4",
    "--eval.enabled",
    "false",
    "--log.progress",
    "false",
    "--log.tensorboard",
    "false",
    "--trainer.threads",
    "1",
    "--trainer.diagnostics_every",
    "0",
]
