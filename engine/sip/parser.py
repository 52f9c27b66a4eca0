"""The one place that chooses the SIP parser: Cython (`ext.sip`) unless
BATON_NO_EXTENSIONS=1 is set or the extension is not built."""
from engine.extensions import load
from engine.sip import parser_py

IMPLEMENTATION = "py"
parse_message = parser_py.parse_message
frame_length = parser_py.frame_length

_c = load("sip")
if _c is not None:
    parse_message = _c.parse_message
    frame_length = _c.frame_length
    IMPLEMENTATION = "c"
