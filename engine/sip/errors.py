"""Errors raised by the SIP stack, shared by the Cython and the Python paths."""
from ext.sip_message import SipParseError  # noqa: F401  (re-exported: one place to import from)


class SipError(Exception):
    """Base of the SIP stack's own errors."""


class SdpError(SipError):
    """An SDP body that cannot be used (answered 488, or 400 when malformed)."""


class HeaderInjectionError(SipError, ValueError):
    """A header name or value (or a Request-URI, a reason phrase) holding CR, LF or
    another control character: written out, it would end the header and start
    another (RFC 3261 25.1: header values are TEXT-UTF8, no CTLs but HTAB)."""

    def __init__(self, what: str, value: str):
        super().__init__(f"{what}: control characters are not allowed in a SIP header "
                         f"({value[:40]!r})")
        self.what = what
