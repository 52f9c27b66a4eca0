"""The one place that chooses the call-control ring: Cython (`ext.ring`) unless
BATON_NO_EXTENSIONS=1 is set or the extension is not built. Both share one
file format, so either side of a ring may be either implementation."""
from engine import ring_py
from engine.extensions import load
from engine.ring_py import (RingBusyError, RingCorruptionError, RingError, RingFormatError,
                      ring_info, ring_paths)

__all__ = ["RingWriter", "RingReader", "RingError", "RingFormatError", "RingBusyError",
           "RingCorruptionError", "ring_info", "ring_paths", "IMPLEMENTATION"]

IMPLEMENTATION = "py"
RingWriter = ring_py.RingWriter
RingReader = ring_py.RingReader

_c = load("ring")
if _c is not None:
    RingWriter = _c.RingWriter
    RingReader = _c.RingReader
    IMPLEMENTATION = "c"
