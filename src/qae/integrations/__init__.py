"""Plugins that put qae's estimators and K controllers into other trainers.

- :mod:`qae.integrations.verl`: estimators ``qae`` and ``qae_adaptive`` registered in
  verl's advantage-estimator registry (needs ``qae[verl]``).
- :mod:`qae.integrations.trl`: ``QAEGRPOTrainer``, TRL's ``GRPOTrainer`` with any qae
  estimator (needs ``qae[trl]``).

Each is imported on its own; importing this package imports neither verl nor TRL.
"""

__all__: list[str] = []
