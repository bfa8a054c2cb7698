"""The math: advantage estimators, policy losses, entropy and run diagnostics.

Pure functions over tensors with shapes in their docstrings, and the name registries
they are picked from (``estimator="qae"``, ``loss="gspo"``). Nothing here reads or writes
files, imports ``transformers`` or knows about the training loop; every other part of
qae may import it.
"""
