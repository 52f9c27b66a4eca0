"""Where the Cython extensions and their pure-Python twins are chosen.

`BATON_NO_EXTENSIONS=1` (any non-empty value) selects every twin; an
extension that is not built falls back to its twin too.
"""
from __future__ import annotations

import importlib
import os


def load(name: str):
    """The built extension `ext.<name>`, or None when the twin must serve."""
    if os.environ.get("BATON_NO_EXTENSIONS"):
        return None
    try:
        return importlib.import_module(f"ext.{name}")
    except ImportError:  # not built
        return None
