"""What a verb handler returns to the document loop (engine/modules/instructions/verbs.py):
`None` (go on with the next verb), `STOP` (control has gone, or the call has), or a
`Fetch` (load and run another document)."""
from __future__ import annotations

from dataclasses import dataclass


class _Stop:
    def __repr__(self) -> str:
        return "STOP"


STOP = _Stop()


@dataclass
class Fetch:
    """Load and run the document at `url`, sending `params` with the request."""
    url: str
    method: str = "POST"
    params: dict | None = None
