"""Evaluation: prompt datasets, input bounds, pass@k / maj@n, and ``qae eval``."""
