"""The one place that chooses the conference mixer: Cython (`ext.mix`) unless
BATON_NO_EXTENSIONS=1 is set or the extension is not built."""
from engine.extensions import load
from engine.media import mix as _py

__all__ = ["Conference", "mix_minus", "LAWS", "MAX_PARTICIPANTS_LIMIT", "IMPLEMENTATION"]

IMPLEMENTATION = "py"
Conference = _py.Conference
mix_minus = _py.mix_minus
LAWS = _py.LAWS
MAX_PARTICIPANTS_LIMIT = _py.MAX_PARTICIPANTS_LIMIT

_c = load("mix")
if _c is not None:
    Conference = _c.Conference
    mix_minus = _c.mix_minus
    IMPLEMENTATION = "c"
