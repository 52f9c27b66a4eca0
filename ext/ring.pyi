"""Call-control ring, the hot-path twin of ext.ring_py (see docs/ring.md)."""
from collections.abc import Mapping
from types import TracebackType
from typing import Any

from ext.ring_py import (RingBusyError as RingBusyError,
                            RingCorruptionError as RingCorruptionError,
                            RingError as RingError, RingFormatError as RingFormatError)

_Bytes = bytes | bytearray | memoryview

class RingWriter:
    """The engine's side of the ring: appends records under seq 1, 2, ... across restarts."""

    def __init__(self, path: str, slots: int = 65536, slot_size: int = 256,
                 node_id: str = "node1") -> None: ...
    @property
    def path(self) -> str: ...
    @property
    def node_id(self) -> str: ...
    @property
    def slots(self) -> int: ...
    @property
    def slot_size(self) -> int: ...
    @property
    def next_seq(self) -> int:
        """The sequence number the next append will get."""
    @property
    def written(self) -> int:
        """Records ever published to this ring."""
    @property
    def spilled(self) -> int:
        """Records ever published through the overflow file."""
    @property
    def fill(self) -> int:
        """Published records the reader has not released (cursor - released)."""
    @property
    def overflow_pending(self) -> int:
        """Overflow bytes published but not yet released."""
    def stats(self) -> dict[str, int]: ...
    def append(self, payload: _Bytes) -> int:
        """Publish one record of raw bytes; return its seq."""
    def append_record(self, obj: Mapping[str, Any]) -> int:
        """Publish msgpack {"seq": seq, "node": node_id, **obj}; return seq."""
    def stamp_transition(self, session_id: str, account: str, from_module: str, to_module: str,
                         level: str, reason: str, mono_ns: int, wall_ns: int) -> int:
        """Publish {"type": "transition", "seq", "node", "session", "account", "from", "to",
        "level", "reason", "mono_ns", "wall_ns"}; return its seq."""
    def stamp_session(self, kind: str, session_id: str, account: str, mono_ns: int, wall_ns: int,
                      reason: str = "") -> int:
        """Publish {"type": "session", "seq", "node", "kind", "session", "account", "reason",
        "mono_ns", "wall_ns"} (kind "start" or "end"); return its seq."""
    def stamp_action(self, session_id: str, account: str, module: str, action: str,
                     count: int) -> int:
        """Publish {"type": "action", "seq", "node", "session", "account", "module", "action",
        "count"}; return its seq."""
    def flush(self) -> None:
        """msync the ring and fsync the overflow (only needed against a machine crash)."""
    def close(self) -> None: ...
    def __enter__(self) -> RingWriter: ...
    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None: ...

class RingReader:
    """The accountant's side of the ring: every record once, in order, from start_seq + 1."""

    def __init__(self, path: str, start_seq: int | None = None) -> None: ...
    @property
    def path(self) -> str: ...
    @property
    def node_id(self) -> str: ...
    @property
    def slots(self) -> int: ...
    @property
    def slot_size(self) -> int: ...
    @property
    def position(self) -> int:
        """The last seq returned by read() (or start_seq)."""
    @property
    def available(self) -> int: ...
    @property
    def written(self) -> int: ...
    @property
    def spilled(self) -> int: ...
    @property
    def fill(self) -> int: ...
    @property
    def overflow_pending(self) -> int: ...
    def stats(self) -> dict[str, int]: ...
    def read(self, max_records: int = 4096) -> list[tuple[int, bytes]]:
        """The next published records as (seq, payload), at most max_records; never waits."""
    def release(self, seq: int) -> None:
        """Let the writer reuse everything <= seq; call only after your own commit."""
    def close(self) -> None: ...
    def __enter__(self) -> RingReader: ...
    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None: ...
