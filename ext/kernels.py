"""The one place that chooses, for every kernel, the Cython extension or its twin.

    from ext.kernels import sip, ring, g711, dtmf, mix, rtp

Each name is a namespace with the kernel's public names and `IMPLEMENTATION`
("c" or "py"). `BATON_NO_EXTENSIONS=1` (any non-empty value) selects every
twin; an extension that is not built falls back to its twin too. The RTP
relay (`ext.rtp`) has no twin: it is the media engine itself, so `rtp` is
always the extension (with `rtp.Conference`, the extension's mixer that its
media clock drives), and using it fails loudly when it is not built; `mix`
is the standalone mixer, twin or extension.
The rest of the code asks this module, never `ext.<kernel>` directly (tests
and benchmarks that compare both implementations are the exception).
"""
from __future__ import annotations

import importlib
import os
from types import SimpleNamespace

__all__ = ["dtmf", "g711", "load", "mix", "ring", "rtp", "sip"]


def load(name: str):
    """The built extension `ext.<name>`, or None when the twin must serve."""
    if os.environ.get("BATON_NO_EXTENSIONS"):
        return None
    try:
        return importlib.import_module(f"ext.{name}")
    except ImportError:  # not built
        return None


def _select(name: str, twin, kernel_names: tuple[str, ...], shared: tuple[str, ...] = ()):
    """`kernel_names` from the extension when it serves, else from the twin;
    `shared` (errors, constants, helpers) always from the twin."""
    c = load(name)
    chosen = c if c is not None else twin
    ns = {k: getattr(chosen, k) for k in kernel_names}
    ns.update({k: getattr(twin, k) for k in shared})
    return SimpleNamespace(IMPLEMENTATION="c" if c is not None else "py", **ns)


# Chosen on first use, so a process that needs only the ring (the accountant)
# loads neither the media kernels nor numpy.
def _sip():
    from ext import sip_py
    return _select("sip", sip_py, ("parse_message", "frame_length", "initial_invite"))


def _ring():
    from ext import ring_py
    return _select("ring", ring_py, ("RingWriter", "RingReader"),
                   ("RingError", "RingFormatError", "RingBusyError", "RingCorruptionError",
                    "ring_info", "ring_paths", "retained"))


def _g711():
    from ext import g711_py
    return _select("g711", g711_py, ("ulaw_encode", "ulaw_decode", "alaw_encode", "alaw_decode"))


def _dtmf():
    from ext import dtmf_py
    return _select("dtmf", dtmf_py, ("DtmfDetector",), ("COLS", "ROWS", "KEYS", "DBM0_AMPLITUDE"))


def _mix():
    from ext import mix_py
    return _select("mix", mix_py, ("Conference", "mix_minus"), ("LAWS", "MAX_PARTICIPANTS_LIMIT"))


def _rtp():
    # No twin (see the docstring). Its media clock mixes conferences itself, so
    # the mixer a conference on the clock needs is the extension's too.
    from ext import mix, rtp
    ns = {k: v for k, v in vars(rtp).items() if not k.startswith("_")}
    return SimpleNamespace(IMPLEMENTATION="c", Conference=mix.Conference, **ns)


_CHOOSERS = {"sip": _sip, "ring": _ring, "g711": _g711, "dtmf": _dtmf, "mix": _mix, "rtp": _rtp}


def __getattr__(name: str):
    try:
        chooser = _CHOOSERS[name]
    except KeyError:
        raise AttributeError(f"module 'ext.kernels' has no attribute {name!r}") from None
    value = globals()[name] = chooser()
    return value
