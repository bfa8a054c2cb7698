"""Plugins that put qae's estimators and K controllers into other trainers.

- :mod:`qae.integrations.verl`: estimators ``qae`` and ``qae_adaptive`` registered in
  verl's advantage-estimator registry (needs ``qae[verl]``).
- :mod:`qae.integrations.trl`: ``QAEGRPOTrainer``, TRL's ``GRPOTrainer`` with any qae
  estimator (needs ``qae[trl]``).
- :mod:`qae.integrations.skyrl`: estimators ``qae`` and ``qae_adaptive`` registered in
  SkyRL's advantage-estimator registry (needs ``qae[skyrl]``, Python 3.12).

Each is imported on its own; importing this package imports none of those trainers.
"""

__all__: list[str] = []
