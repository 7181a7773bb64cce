"""Scripts around the demo model (demo, training, evaluation, screenshot); run from the repository root as
``python -m tools.<name>``."""
