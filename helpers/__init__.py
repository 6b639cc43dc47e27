"""Pruning lab helpers: checkpoint surgery, scoring, routing and evaluation behind the notebooks.

Usage: `from helpers import checkpoint, arch` (or `python -m helpers --help`).
"""

__version__ = "0.1.0"
