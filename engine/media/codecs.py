"""The one place that chooses the media kernels: Cython (`ext.g711`,
`ext.dtmf`) unless BATON_NO_EXTENSIONS=1 is set or an extension is not built.

`IMPLEMENTATION` is "c" when both extensions serve, "py" when neither does
and "mixed" otherwise; `G711_IMPLEMENTATION` and `DTMF_IMPLEMENTATION` say
which one each part uses.
"""
from engine.extensions import load
from engine.media import dtmf as _dtmf_py
from engine.media import g711 as _g711_py

G711_IMPLEMENTATION = "py"
DTMF_IMPLEMENTATION = "py"
ulaw_encode = _g711_py.ulaw_encode
ulaw_decode = _g711_py.ulaw_decode
alaw_encode = _g711_py.alaw_encode
alaw_decode = _g711_py.alaw_decode
DtmfDetector = _dtmf_py.DtmfDetector

_g711_c = load("g711")
if _g711_c is not None:
    ulaw_encode = _g711_c.ulaw_encode
    ulaw_decode = _g711_c.ulaw_decode
    alaw_encode = _g711_c.alaw_encode
    alaw_decode = _g711_c.alaw_decode
    G711_IMPLEMENTATION = "c"
_dtmf_c = load("dtmf")
if _dtmf_c is not None:
    DtmfDetector = _dtmf_c.DtmfDetector
    DTMF_IMPLEMENTATION = "c"

IMPLEMENTATION = (G711_IMPLEMENTATION if G711_IMPLEMENTATION == DTMF_IMPLEMENTATION
                  else "mixed")
