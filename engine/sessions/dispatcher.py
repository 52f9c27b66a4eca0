"""The dispatcher: module codes resolve to where the module lives.

A code is an alias, so a module can move (from a built-in to a vendor
process, from one URI to another) without breaking the apps that name it.
"""
from __future__ import annotations

import logging

log = logging.getLogger("baton.registry")

MAX_ALIAS_DEPTH = 8


class Registry:
    def __init__(self, engine, builtins: dict, aliases: dict | None = None):
        self.engine = engine
        self.builtins = builtins              # code -> Module class
        self.aliases = dict(aliases or {})    # code -> {"alias"|"uri"|"vendor": ...}
        self.vendors: dict = {}               # code -> attached vendor module (gRPC)
        self._instances: dict = {}

    def resolve(self, code: str):
        """The module serving `code` now, or None (unknown, or a vendor that is gone)."""
        seen = 0
        while code in self.aliases and seen < MAX_ALIAS_DEPTH:
            entry = self.aliases[code]
            seen += 1
            if "alias" in entry:
                code = entry["alias"]
                continue
            if "uri" in entry:
                return self._instance("baton.instructions", {"url": entry["uri"]}, code)
            if entry.get("vendor"):
                return self.vendors.get(code)
            break
        vendor = self.vendors.get(code)
        if vendor is not None:
            return vendor
        return self._instance(code, None, code)

    def _instance(self, builtin: str, params, code: str):
        key = (code, builtin)
        m = self._instances.get(key)
        if m is None:
            cls = self.builtins.get(builtin)
            if cls is None:
                return None
            m = cls(self.engine, params or {})
            if code != builtin:
                m.code = code
            self._instances[key] = m
        return m

    def known(self) -> list[str]:
        return sorted(set(self.builtins) | set(self.aliases) | set(self.vendors))
