"""Training: the RL loop and the pieces only it uses.

:mod:`~qae.train.trainer` is the loop, top to bottom (prompts, rollout, rewards, batch
filters, advantages, update, metrics, checkpoint); :mod:`~qae.train.update` the update
phase; :mod:`~qae.train.rollout`, :mod:`~qae.train.sampler` and
:mod:`~qae.train.vllm_rollout` the rollout backends; :mod:`~qae.train.filters` the batch
transforms (dynamic sampling, overlong handling); :mod:`~qae.train.step_diagnostics` the
per-step diagnostics; :mod:`~qae.train.config` the one dataclass tree of a training run.
"""
