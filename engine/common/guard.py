"""The operator's limits on what untrusted parties may make the engine do.

`[security]` in the config (docs/security.md, docs/configuration.md):

- `sounds_dirs`: directories every account's plays may read besides the
  engine's `sounds/` and the account's own recordings (operator-only: no
  document, vendor or API parameter widens it);
- `max_setup_per_source`: INVITEs from one source address still being set
  up (not answered) at once; more get 503 (trusted trunks are exempt);
- `fetch_allow` / `fetch_deny`: networks (CIDR) or `HOST:PORT`s documents'
  fetches may or may not reach; by default loopback, link-local, unspecified
  and multicast addresses and the engine's own ports are denied;
- `fetch_timeout_max`: the longest `timeout` a document's fetch may ask for;
- `tts_cache_bytes`: the bound of the text-to-speech cache (least recently
  used entries go first);
- `watch_streams_per_token`: concurrent `Watch` streams one bearer token may
  hold (more get RESOURCE_EXHAUSTED).
"""
from __future__ import annotations

import functools
import ipaddress
import os
import stat
from dataclasses import dataclass, field

SCHEMA = {
    "sounds_dirs": (list, "directories every account's <Play>file: and baton.play may read"),
    "max_setup_per_source": (int, "INVITEs from one source address in setup at once (0: no "
                                  "limit; default 30); more get 503"),
    "fetch_allow": (list, "CIDRs or HOST:PORTs documents' fetches may reach even if denied"),
    "fetch_deny": (list, "CIDRs or HOST:PORTs documents' fetches may never reach"),
    "fetch_timeout_max": ((int, float), "longest timeout a document's fetch may use, "
                                        "seconds (default 15)"),
    "tts_cache_bytes": (int, "bound of the text-to-speech cache in bytes (default 64 MiB)"),
    "watch_streams_per_token": (int, "concurrent Watch streams per bearer token (default 8)"),
}

# Never a document's business: loopback, link-local (cloud metadata), unspecified,
# multicast and reserved addresses.
DEFAULT_DENY = ("127.0.0.0/8", "::1/128", "169.254.0.0/16", "fe80::/10", "0.0.0.0/8",
                "::/128", "224.0.0.0/4", "ff00::/8", "240.0.0.0/4", "::ffff:127.0.0.0/104")


@dataclass
class Rule:
    net: object            # an ip_network
    port: int = 0          # 0: any port

    def matches(self, ip, port: int) -> bool:
        return ip.version == self.net.version and ip in self.net and \
            (self.port == 0 or self.port == port)


@dataclass
class Guard:
    sounds_dirs: list = field(default_factory=list)
    max_setup_per_source: int = 30
    fetch_allow: list = field(default_factory=list)     # [Rule]
    fetch_deny: list = field(default_factory=list)      # [Rule]
    fetch_timeout_max: float = 15.0
    tts_cache_bytes: int = 64 << 20
    watch_streams_per_token: int = 8
    own_ports: set = field(default_factory=set)         # the engine's listening ports

    def fetch_refused(self, host: str, port: int) -> bool:
        """True when a document may not fetch from `host` (an IP address) on `port`."""
        try:
            ip = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return True
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        allowed = [r for r in self.fetch_allow if r.matches(ip, port)]
        if port in self.own_ports and (ip.is_private or ip.is_loopback or ip.is_link_local) \
                and not any(r.port == port for r in allowed):
            return True      # the engine's own listeners: only when allowed by port
        if allowed:
            return False
        if any(r.matches(ip, port) for r in self.fetch_deny):
            return True
        return any(ip in n for n in _DEFAULT_NETS if n.version == ip.version)


_DEFAULT_NETS = [ipaddress.ip_network(n) for n in DEFAULT_DENY]


def _rule(key: str, text) -> Rule:
    if not isinstance(text, str) or not text:
        raise ValueError(key, "a CIDR (10.0.0.0/8) or HOST:PORT (127.0.0.1:8080)")
    port = 0
    net = text
    if text.startswith("["):
        net, _, rest = text[1:].partition("]")
        port = int(rest[1:]) if rest.startswith(":") and rest[1:].isdigit() else -1
    elif text.count(":") == 1:
        net, _, p = text.partition(":")
        port = int(p) if p.isdigit() else -1
    try:
        network = ipaddress.ip_network(net, strict=False)
    except ValueError:
        network = None
    if network is None or not 0 <= port <= 65535:
        raise ValueError(key, f"{text!r} is not a CIDR or HOST:PORT")
    return Rule(network, port)


def load(raw: dict) -> Guard:
    """The `[security]` table (types already checked against SCHEMA); a value that
    cannot be used raises ValueError(key, problem)."""
    g = Guard()
    sec = raw.get("security", {}) or {}
    dirs = sec.get("sounds_dirs", [])
    if not all(isinstance(d, str) and d.startswith("/") for d in dirs):
        raise ValueError("security.sounds_dirs", "a list of absolute directory paths")
    g.sounds_dirs = list(dirs)
    for key in ("max_setup_per_source", "tts_cache_bytes", "watch_streams_per_token"):
        if key in sec:
            if sec[key] < 0:
                raise ValueError(f"security.{key}", "0 or more")
            setattr(g, key, sec[key])
    if "fetch_timeout_max" in sec:
        if not 0 < sec["fetch_timeout_max"] <= 600:
            raise ValueError("security.fetch_timeout_max", "seconds between 0 and 600")
        g.fetch_timeout_max = float(sec["fetch_timeout_max"])
    for key in ("fetch_allow", "fetch_deny"):
        setattr(g, key, [_rule(f"security.{key}[{i}]", t)
                         for i, t in enumerate(sec.get(key, []))])
    return g


def trusted_source(cfg, host: str) -> bool:
    """True when `host` is the address of a trunk marked `trusted = true`."""
    if not host:
        return False
    return any(t.trusted and _same_ip(t.host, host) for t in cfg.trunks.values())


def _same_ip(a: str, b: str) -> bool:
    if a == b:
        return True     # the usual case, without parsing two addresses per call
    return _ip_key(a) == _ip_key(b)


@functools.lru_cache(maxsize=4096)
def _ip_key(host: str):
    """An address in a form that compares equal however it was written (a name: lower case)."""
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return host.lower()


def media_trusted(cfg, source: str, sdp_addr: str) -> bool:
    """May media go to `sdp_addr` before anything arrived from there? Only when it is
    where the signalling came from, or the peer is a trusted trunk."""
    return bool(source) and (_same_ip(source, sdp_addr) or trusted_source(cfg, source))


class SetupLimiter:
    """INVITEs in setup per source address (RFC 3261 has no such limit; an
    unanswered call still holds ports and may still send media)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.counts: dict[str, int] = {}

    def enter(self, source: str) -> bool:
        n = self.counts.get(source, 0)
        if self.limit and n >= self.limit:
            return False
        self.counts[source] = n + 1
        return True

    def leave(self, source: str) -> None:
        n = self.counts.get(source, 0) - 1
        if n > 0:
            self.counts[source] = n
        else:
            self.counts.pop(source, None)


PRIVATE_UMASK = 0o077


def private_dir(path: str) -> None:
    """Create `path` 0700, or make sure it is this user's directory and close it to
    others (stored data and sockets are private to the engine's user)."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        raise OSError(f"{path} must be a directory owned by this user")
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)
