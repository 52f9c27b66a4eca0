"""Call-progress tones generated as 8 kHz PCM (ITU-T E.180 style cadences)."""
from __future__ import annotations

import numpy as np

RATE = 8000


def dual(f1: float, f2: float, seconds: float, level: float = 0.12) -> np.ndarray:
    t = np.arange(int(RATE * seconds)) / RATE
    x = level * 32767 * (np.sin(2 * np.pi * f1 * t) + np.sin(2 * np.pi * f2 * t)) / 2
    return x.astype(np.int16)


def ringback() -> np.ndarray:
    """440 + 480 Hz, 2 s on, 4 s off: one cadence, looped by the player."""
    return np.concatenate([dual(440, 480, 2.0), np.zeros(RATE * 4, dtype=np.int16)])
