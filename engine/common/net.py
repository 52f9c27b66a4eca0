"""Host and port text, as the config, the metrics and HTTP servers and the SIP
transport spell them."""
from __future__ import annotations

__all__ = ["parse_hostport", "format_hostport"]


def parse_hostport(text: str, default_port: int = 5060) -> tuple[str, int]:
    """`HOST:PORT`, `[V6]:PORT`, `HOST` -> (host, port); raises ValueError."""
    text = text.strip()
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"unterminated IPv6 reference in {text!r}")
        host = text[1:end]
        rest = text[end + 1:]
        if rest and not rest.startswith(":"):
            raise ValueError(f"garbage after IPv6 reference in {text!r}")
        port = int(rest[1:]) if rest else default_port
    elif text.count(":") > 1:
        host, port = text, default_port  # bare IPv6 literal
    else:
        host, _, p = text.partition(":")
        port = int(p) if p else default_port
    if not host or not 0 <= port <= 65535:
        raise ValueError(f"bad address {text!r}")
    return host, port


def format_hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
