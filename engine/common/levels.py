"""Levels of control, shared by the engine (which stamps them) and the
accountant (which prices the time spent at each)."""
from __future__ import annotations

LEVELS = ("basic", "application", "service")
# The pseudo-level of a module that was offered a session and has not taken it
# yet (a vendor module before its Take): the time is metered, so a session's
# segments still add up to its duration, but it is priced at nothing and pays
# no vendor.
OFFER = "offer"

__all__ = ["LEVELS", "OFFER"]
