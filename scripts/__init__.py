"""Runnable scripts of the project, run from the repository root with ``python -m``:
``python -m scripts.demo`` (``make demo``); ``scripts/generate_certs.py`` also runs by path."""
