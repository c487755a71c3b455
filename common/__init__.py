"""What every other package stands on: audio and weights I/O, and the contract between a sampler and the trainer.

It imports nothing else of vocalign, so ``rewards`` and ``policies`` both use it without importing each other, and
the trainer's core uses it without importing ``policies`` (``tests/test_dependency_direction.py`` checks the
direction).
"""
