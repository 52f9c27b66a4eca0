"""Errors shared across packages, in a leaf module that imports nothing of Baton,
so that whoever raises one (the config loader, a module's config check, the
webhooks settings, the API keys) does not import whoever else does."""
from __future__ import annotations

__all__ = ["ConfigError"]


class ConfigError(Exception):
    """A configuration problem: the file, the key (dotted) and what is wrong with it."""

    def __init__(self, path: str, key: str, problem: str):
        super().__init__(f"{path}: {key}: {problem}")
        self.path = path
        self.key = key
        self.problem = problem
