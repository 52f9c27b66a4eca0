"""G.711 μ-law and A-law codec (ITU-T G.711), table driven; twin of ext.g711_py."""
from typing import Union

import numpy as np
import numpy.typing as npt

_Pcm = Union[bytes, bytearray, memoryview, npt.NDArray[np.int16]]
_Codes = Union[bytes, bytearray, memoryview]

def ulaw_encode(pcm: _Pcm) -> bytes:
    """Encode 16-bit linear PCM (little-endian bytes or int16 array) to μ-law, one byte per sample."""

def ulaw_decode(data: _Codes) -> bytes:
    """Decode μ-law bytes to 16-bit linear PCM, returned as little-endian bytes."""

def alaw_encode(pcm: _Pcm) -> bytes:
    """Encode 16-bit linear PCM (little-endian bytes or int16 array) to A-law, one byte per sample."""

def alaw_decode(data: _Codes) -> bytes:
    """Decode A-law bytes to 16-bit linear PCM, returned as little-endian bytes."""
