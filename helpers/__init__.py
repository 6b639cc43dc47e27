"""Pruning lab helpers: checkpoint surgery, scoring, routing and evaluation behind the notebooks.

Usage: `from helpers import checkpoint, arch` (or `python -m helpers --help`).
"""

import warnings

# tqdm.auto falls back to text bars without ipywidgets; the bars work, the warning is noise.
warnings.filterwarnings("ignore", message="IProgress not found")

__version__ = "0.1.0"
