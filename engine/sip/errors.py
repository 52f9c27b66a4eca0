"""Errors raised by the SIP stack, shared by the Cython and the Python paths."""
from ext.sip_message import SipParseError  # noqa: F401  (re-exported: one place to import from)


class SipError(Exception):
    """Base of the SIP stack's own errors."""


class SdpError(SipError):
    """An SDP body that cannot be used (answered 488, or 400 when malformed)."""
