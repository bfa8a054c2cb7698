"""Evaluation: prompt datasets, prompt templates, pass@k / maj@n, and ``qae eval``.

The leaf modules (:mod:`~qae.eval.datasets`, :mod:`~qae.eval.prompts`,
:mod:`~qae.eval.metrics`, :mod:`~qae.eval.bounds`) are shared with the training loop, so
a problem is loaded, asked and scored the same way in both; :mod:`~qae.eval.evaluate`
samples and scores a model, and :mod:`~qae.eval.command` is the ``qae eval`` command.
"""
