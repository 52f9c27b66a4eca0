"""In-band DTMF detector (ITU-T Q.24); twin of ext.dtmf_py."""
from typing import Union

import numpy as np
import numpy.typing as npt

_Pcm = Union[bytes, bytearray, memoryview, npt.NDArray[np.int16]]

class DtmfDetector:
    """Streaming DTMF detector for one channel of 16-bit linear PCM."""

    def __init__(self, rate: int = 8000) -> None: ...
    @property
    def rate(self) -> int: ...
    def reset(self) -> None:
        """Forget all audio and any digit in progress; onsets restart at 0."""
    def feed(self, pcm: _Pcm) -> list[tuple[str, int]]:
        """Process more samples; return the newly detected `(digit, onset_sample)` pairs."""
