"""Run I/O: what a run writes and how it reads itself back.

Atomic file writes, the metrics log and checkpoints, the lock on a run directory,
resuming from the newest whole checkpoint, the errors a run reports in one line, and the
config tools that turn dataclasses into YAML files and command-line flags. Nothing here
knows what is being trained; it imports nothing else of qae.
"""
