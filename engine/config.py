"""Baton's TOML configuration: loading and validation.

Every problem is reported as `FILE: KEY: PROBLEM`, so a bad config fails at
start with a message that says what to fix.
"""
from __future__ import annotations

import ipaddress
import os
import tomllib
from dataclasses import dataclass, field

from .sip.transport import parse_hostport

MODULE_CODES_BUILTIN = ("baton.hold", "baton.echo")


class ConfigError(Exception):
    def __init__(self, path: str, key: str, problem: str):
        super().__init__(f"{path}: {key}: {problem}")
        self.path = path
        self.key = key
        self.problem = problem


@dataclass
class NumberRoute:
    number: str
    account: str
    module: str
    params: dict = field(default_factory=dict)


@dataclass
class Account:
    id: str
    name: str = ""
    currency: str = "USD"
    numbers: dict = field(default_factory=dict)   # number -> NumberRoute


@dataclass
class Config:
    path: str = "<defaults>"
    sip_host: str = "127.0.0.1"
    sip_port: int = 5060
    transports: tuple = ("udp", "tcp")
    advertise: str = ""
    grpc_addr: str = "127.0.0.1:50051"
    data_dir: str = ".baton"
    node_id: str = "node1"
    user_agent: str = ""
    log_level: str = "info"
    media_address: str = "127.0.0.1"
    rtp_port_min: int = 20000
    rtp_port_max: int = 29999
    rtp_timeout: float = 60.0
    rtp_hold_timeout: float = 7200.0
    registrar_mode: str = "open"
    realm: str = "baton"
    users: dict = field(default_factory=dict)      # username -> password
    accounts: dict = field(default_factory=dict)   # id -> Account
    numbers: dict = field(default_factory=dict)    # number -> NumberRoute (all accounts)
    raw: dict = field(default_factory=dict)


# The schema: section -> key -> (type, description). Unknown keys are errors,
# so a typo never silently falls back to a default.
SCHEMA = {
    "engine": {
        "sip_addr": (str, "SIP listen address HOST:PORT ([v6]:PORT for IPv6)"),
        "transports": (list, "SIP transports to listen on: udp, tcp"),
        "advertise": (str, "address put in Via/Contact/SDP (default: the SIP host)"),
        "grpc_addr": (str, "gRPC control API listen address"),
        "data_dir": (str, "directory for the ring, ledger and caches"),
        "node_id": (str, "this engine node's id (in ring records and ledger keys)"),
        "user_agent": (str, "Server/User-Agent header value"),
        "log_level": (str, "debug, info, warning or error"),
    },
    "media": {
        "address": (str, "address RTP binds to and advertises in SDP"),
        "rtp_port_min": (int, "lowest RTP port (even)"),
        "rtp_port_max": (int, "highest RTP port"),
        "rtp_timeout": ((int, float), "seconds without RTP before a call is ended"),
        "rtp_hold_timeout": ((int, float), "the same while the call is on hold"),
    },
    "registrar": {
        "mode": (str, "open, auth or off"),
        "realm": (str, "digest realm"),
    },
}


def _check_type(path, key, value, typ):
    if isinstance(typ, tuple):
        if isinstance(value, bool) or not isinstance(value, typ):
            raise ConfigError(path, key, f"expected a number, got {value!r}")
        return
    if typ is int and isinstance(value, bool):
        raise ConfigError(path, key, f"expected an integer, got {value!r}")
    if not isinstance(value, typ):
        raise ConfigError(path, key, f"expected {typ.__name__}, got {type(value).__name__} {value!r}")


def load(path: str | None, overrides: dict | None = None) -> Config:
    """Load and validate a config file (None: defaults only)."""
    raw = {}
    if path is not None:
        try:
            with open(path, "rb") as f:
                raw = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(path, "-", "file not found") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(path, "-", f"invalid TOML: {exc}") from None
    return from_dict(raw, path or "<defaults>", overrides or {})


def from_dict(raw: dict, path: str = "<dict>", overrides: dict | None = None) -> Config:
    cfg = Config(path=path, raw=raw)
    known = set(SCHEMA) | {"users", "accounts"}
    for section in raw:
        if section not in known:
            raise ConfigError(path, section, f"unknown section (known: {', '.join(sorted(known))})")
    for section, keys in SCHEMA.items():
        sect = raw.get(section, {})
        if not isinstance(sect, dict):
            raise ConfigError(path, section, "expected a table")
        for key, value in sect.items():
            if key not in keys:
                raise ConfigError(path, f"{section}.{key}",
                                  f"unknown key (known: {', '.join(sorted(keys))})")
            _check_type(path, f"{section}.{key}", value, keys[key][0])

    eng = dict(raw.get("engine", {}))
    eng.update({k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        cfg.sip_host, cfg.sip_port = parse_hostport(eng.get("sip_addr", "127.0.0.1:5060"))
    except ValueError as exc:
        raise ConfigError(path, "engine.sip_addr", str(exc)) from None
    transports = tuple(t.lower() for t in eng.get("transports", ["udp", "tcp"]))
    for t in transports:
        if t not in ("udp", "tcp"):
            raise ConfigError(path, "engine.transports", f"unsupported transport {t!r} (udp, tcp)")
    if not transports:
        raise ConfigError(path, "engine.transports", "at least one transport is needed")
    cfg.transports = transports
    cfg.advertise = eng.get("advertise", "") or cfg.sip_host
    if cfg.advertise in ("0.0.0.0", "::"):
        raise ConfigError(path, "engine.advertise",
                          "a wildcard address cannot be advertised; set engine.advertise")
    cfg.grpc_addr = eng.get("grpc_addr", cfg.grpc_addr)
    try:
        parse_hostport(cfg.grpc_addr, 50051)
    except ValueError as exc:
        raise ConfigError(path, "engine.grpc_addr", str(exc)) from None
    cfg.data_dir = eng.get("data_dir", cfg.data_dir)
    cfg.node_id = eng.get("node_id", cfg.node_id)
    cfg.user_agent = eng.get("user_agent", "")
    cfg.log_level = eng.get("log_level", "info")
    if cfg.log_level not in ("debug", "info", "warning", "error"):
        raise ConfigError(path, "engine.log_level", f"unknown level {cfg.log_level!r}")

    media = raw.get("media", {})
    cfg.media_address = media.get("address", cfg.advertise)
    try:
        ipaddress.ip_address(cfg.media_address)
    except ValueError:
        raise ConfigError(path, "media.address", f"not an IP address: {cfg.media_address!r}") from None
    cfg.rtp_port_min = media.get("rtp_port_min", cfg.rtp_port_min)
    cfg.rtp_port_max = media.get("rtp_port_max", cfg.rtp_port_max)
    if not (1024 <= cfg.rtp_port_min < cfg.rtp_port_max <= 65535):
        raise ConfigError(path, "media.rtp_port_min",
                          "need 1024 <= rtp_port_min < rtp_port_max <= 65535")
    cfg.rtp_timeout = float(media.get("rtp_timeout", cfg.rtp_timeout))
    cfg.rtp_hold_timeout = float(media.get("rtp_hold_timeout", cfg.rtp_hold_timeout))
    for key in ("rtp_timeout", "rtp_hold_timeout"):
        if getattr(cfg, key) <= 0:
            raise ConfigError(path, f"media.{key}", "must be a positive number of seconds")
    if cfg.rtp_port_max - cfg.rtp_port_min < 3:
        raise ConfigError(path, "media.rtp_port_max", "the range holds no RTP/RTCP pair")

    reg = raw.get("registrar", {})
    cfg.registrar_mode = reg.get("mode", "open")
    if cfg.registrar_mode not in ("open", "auth", "off"):
        raise ConfigError(path, "registrar.mode", f"must be open, auth or off, not {cfg.registrar_mode!r}")
    cfg.realm = reg.get("realm", "baton")

    users = raw.get("users", {})
    if not isinstance(users, dict):
        raise ConfigError(path, "users", "expected a table of users")
    for name, u in users.items():
        if not isinstance(u, dict) or not isinstance(u.get("password"), str) or not u["password"]:
            raise ConfigError(path, f"users.{name}.password", "a non-empty string is required")
        cfg.users[name] = u["password"]

    accounts = raw.get("accounts", {})
    if not isinstance(accounts, dict):
        raise ConfigError(path, "accounts", "expected a table of accounts")
    for acc_id, acc in accounts.items():
        key = f"accounts.{acc_id}"
        if not isinstance(acc, dict):
            raise ConfigError(path, key, "expected a table")
        a = Account(id=acc_id, name=acc.get("name", acc_id), currency=acc.get("currency", "USD"))
        for k in acc:
            if k not in ("name", "currency", "numbers"):
                raise ConfigError(path, f"{key}.{k}", "unknown key (known: currency, name, numbers)")
        numbers = acc.get("numbers", {})
        if not isinstance(numbers, dict):
            raise ConfigError(path, f"{key}.numbers", "expected a table of number = { module = ... }")
        for number, target in numbers.items():
            nkey = f"{key}.numbers.{number}"
            if isinstance(target, str):
                target = {"module": target}
            if not isinstance(target, dict) or "module" not in target:
                raise ConfigError(path, nkey, "needs a module (e.g. module = \"baton.hold\")")
            module = target["module"]
            if module not in MODULE_CODES_BUILTIN:
                raise ConfigError(path, f"{nkey}.module",
                                  f"unknown module {module!r} (known: {', '.join(MODULE_CODES_BUILTIN)})")
            if number in cfg.numbers:
                raise ConfigError(path, nkey, f"number already belongs to account {cfg.numbers[number].account!r}")
            params = {k: v for k, v in target.items() if k != "module"}
            route = NumberRoute(number=number, account=acc_id, module=module, params=params)
            a.numbers[number] = route
            cfg.numbers[number] = route
        cfg.accounts[acc_id] = a
    if overrides and overrides.get("data_dir"):
        cfg.data_dir = overrides["data_dir"]
    cfg.data_dir = os.path.abspath(cfg.data_dir)
    return cfg
