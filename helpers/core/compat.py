"""Outputs that transformers 4.57 and 5.x both read the same way.

transformers 5 writes `tokenizer_class: TokenizersBackend` (4.57: "Tokenizer class TokenizersBackend does
not exist") and keeps the RoPE base only in `rope_parameters` (4.x reads `rope_theta` and would silently
use its default). `make_portable(dir)` rewrites a checkpoint directory's tokenizer_config.json and
config.json in place: the tokenizer class becomes PreTrainedTokenizerFast (the same tokenizer.json, the
same ids in both versions), and `rope_theta` is written beside `rope_parameters`.

Usage: `make_portable(tmp)` before an output directory is renamed into place
"""

from __future__ import annotations

import json
from pathlib import Path

PORTABLE_TOKENIZER = "PreTrainedTokenizerFast"
V5_ONLY_TOKENIZERS = {"TokenizersBackend"}


def portable_config(config: dict) -> dict:
    """`config` with rope_theta beside rope_parameters (and in each text sub-config), as 4.x reads it."""
    out = dict(config)
    rope = out.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope and "rope_theta" not in out:
        out["rope_theta"] = rope["rope_theta"]
    for k, v in out.items():
        if isinstance(v, dict) and "rope_parameters" in v:
            out[k] = portable_config(v)
    return out


def portable_tokenizer_config(tc: dict) -> dict:
    """A tokenizer_config whose class both versions know (the fast tokenizer over tokenizer.json)."""
    if tc.get("tokenizer_class") in V5_ONLY_TOKENIZERS:
        tc = {k: v for k, v in tc.items() if k != "backend"}
        tc["tokenizer_class"] = PORTABLE_TOKENIZER
    return tc


def make_portable(d) -> None:
    """Rewrite `d`/config.json and `d`/tokenizer_config.json where 4.57 would misread them (no-op otherwise)."""
    d = Path(d)
    for name, fix in (("config.json", portable_config), ("tokenizer_config.json", portable_tokenizer_config)):
        p = d / name
        if not p.exists():
            continue
        old = json.loads(p.read_text())
        new = fix(old)
        if new != old:
            p.unlink()  # a copied side file may be a hard link or read-only: write a fresh file
            p.write_text(json.dumps(new, indent=2, sort_keys=name == "config.json") + "\n")
