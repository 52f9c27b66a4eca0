"""Baton's TOML configuration: loading and validation.

Every problem is reported as `FILE: KEY: PROBLEM`, so a bad config fails at
start with a message that says what to fix.
"""
from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from dataclasses import dataclass, field

from engine.sessions import dialing
from engine.common.errors import ConfigError  # noqa: F401  (raised by load(): importable from here too)
from engine.common.net import parse_hostport
from engine.common import guard as _guard

TARGET_KINDS = ("app", "module", "instructions", "endpoint")



@dataclass
class NumberRoute:
    """What a dialled number starts: an app, a module, an instruction URI or an endpoint."""
    number: str
    account: str
    kind: str            # app | module | instructions | endpoint
    target: str          # app name, module code, URI, or SIP URI / number
    params: dict = field(default_factory=dict)
    module: str = ""      # the first module's code (derived from kind and target)

    def __post_init__(self):
        self.module = {"module": self.target, "endpoint": "baton.bridge",
                       "instructions": "baton.instructions"}.get(self.kind, "")


@dataclass
class Trunk:
    name: str
    host: str
    port: int = 5060
    transport: str = "udp"
    username: str = ""
    password: str = ""
    prefix: str = ""
    domain: str = ""
    trusted: bool = False
    message_split: str = "segments"   # how a long text goes out: "segments" or "none"
    message_max: int = 10             # segments with "segments", UTF-8 octets with "none"


@dataclass
class Account:
    id: str
    name: str = ""
    currency: str = "USD"
    numbers: dict = field(default_factory=dict)   # number -> NumberRoute
    kv: dict = field(default_factory=dict)        # the account's key/value store
    api_tokens: list = field(default_factory=list)  # bearer tokens for the control API
    outbound: object = None   # sessions.dialing.Outbound: what it may dial (None: deny all)


@dataclass
class Cluster:
    """[cluster]: the Redis session directory shared by a cluster's nodes."""
    redis: str = ""                 # "": no directory
    prefix: str = "baton:"
    directory_ttl: float = 30.0
    forward: bool = True
    grpc_advertise: str = ""
    reservations: str = ""          # "": each node counts prepaid funds alone
    slice: str = "1.00"
    reservation_ttl: float = 60.0
    cap_slice: int = 60             # seconds of a capped module reserved per grant
    shared_quotas: bool = True      # API-key quotas counted in `redis` (when it is set)

    def slice_micro(self) -> int:
        """The slice in micro-units (0 if it is not an amount)."""
        import decimal

        try:
            return int(decimal.Decimal(str(self.slice)) * 1_000_000)
        except (decimal.InvalidOperation, ValueError):
            return 0


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
    drain_timeout: float = 0.0
    user_agent: str = ""
    log_level: str = "info"
    log_format: str = "text"
    metrics_addr: str = ""             # HOST:PORT of the engine's /metrics ("": off)
    http_addr: str = ""                # HOST:PORT of recordings and the REST API ("": off)
    accountant_metrics_addr: str = ""  # HOST:PORT of the accountant's /metrics ("": off)
    media_address: str = "127.0.0.1"
    rtp_port_min: int = 20000
    rtp_port_max: int = 29999
    rtp_timeout: float = 60.0
    rtp_hold_timeout: float = 7200.0
    registrar_mode: str = "open"
    realm: str = "baton"
    registrar_limits: dict = field(default_factory=dict)  # [registrar] bounds (RegistrarLimits)
    tcp_limits: dict = field(default_factory=dict)        # [sip] TCP bounds (transport.TcpLimits)
    udp_rcvbuf: int = 4 << 20                             # [sip] udp_rcvbuf
    overload: dict = field(default_factory=dict)          # [overload] (sip.overload.OverloadLimits)
    users: dict = field(default_factory=dict)      # username -> password
    accounts: dict = field(default_factory=dict)   # id -> Account
    numbers: dict = field(default_factory=dict)    # number -> NumberRoute (all accounts)
    messaging_numbers: dict = field(default_factory=dict)  # number -> its messaging NumberRoute
    messaging: dict = field(default_factory=dict)  # [messaging]: idle_timeout, max_bytes, auth
    apps: dict = field(default_factory=dict)       # name -> apps.App
    trunks: dict = field(default_factory=dict)     # name -> Trunk
    modules: dict = field(default_factory=dict)    # code -> {"alias"|"uri"|"vendor": ...}
    policy: dict = field(default_factory=dict)
    raw: dict = field(default_factory=dict)
    call_center: object = None                     # services.call_center.CenterConfig
    api_keys: dict = field(default_factory=dict)   # id -> engine.config.api_keys.ApiKey
    operator_tokens: list = field(default_factory=list)  # platform-wide bearer tokens
    vendor_outbound: dict = field(default_factory=dict)  # vendor -> sessions.dialing.Outbound
    guard: _guard.Guard = field(default_factory=_guard.Guard)  # the [security] limits
    cluster: Cluster = field(default_factory=Cluster)  # the [cluster] settings (docs/cluster.md)


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
        "drain_timeout": ((int, float), "seconds SIGTERM waits for calls in progress to end "
                                        "(new calls and OPTIONS get 503) before ending them "
                                        "with BYE (default 0: at once)"),
        "log_level": (str, "debug, info, warning or error"),
        "log_format": (str, "text (human) or json (one JSON object per line)"),
        "metrics_addr": (str, "HOST:PORT serving Prometheus /metrics of the engine (port 0: any)"),
        "accountant_metrics_addr": (str, "HOST:PORT serving /metrics of the accountant child"),
        "grpc": (bool, "serve the gRPC control API (default true)"),
        "rest": (bool, "serve the REST API on http_addr (default true)"),
        "rest_recordings_public": (bool, "REST Recordings/{Sid}.wav is served without credentials "
                                         "(default false: the account's credentials)"),
        "http_addr": (str, "HTTP address HOST:PORT: recordings (RecordingUrl) and the REST API"),
        "grpc_tls_cert": (str, "PEM certificate for the gRPC server (enables TLS)"),
        "grpc_tls_key": (str, "PEM private key for the gRPC server"),
        "grpc_tls_client_ca": (str, "PEM CA bundle: require client certificates (mutual TLS)"),
        "operator_tokens": (list, "platform operator bearer tokens for the control API: every "
                                  "account and vendor (32+ characters each)"),
    },
    "media": {
        "address": (str, "address RTP binds to and advertises in SDP"),
        "rtp_port_min": (int, "lowest RTP port (even)"),
        "rtp_port_max": (int, "highest RTP port"),
        "rtp_timeout": ((int, float), "seconds without RTP before a call is ended"),
        "rtp_hold_timeout": ((int, float), "the same while the call is on hold"),
    },
    "sip": {
        "tcp_idle_timeout": ((int, float), "seconds a SIP/TCP connection may go without a "
                                           "complete message or keep-alive (default 120)"),
        "tcp_max_connections": (int, "SIP/TCP connections in all (default 4096)"),
        "tcp_max_per_source": (int, "SIP/TCP connections per source IP address (default 64)"),
        "udp_rcvbuf": (int, "octets of receive buffer asked for each SIP/UDP socket "
                            "(default 4194304; capped by net.core.rmem_max)"),
    },
    "overload": {
        "enabled": (bool, "refuse new INVITEs and out-of-dialog MESSAGEs with 503 + "
                          "Retry-After when overloaded (default true)"),
        "max_calls_in_setup": (int, "enter overload at this many calls in setup: INVITEs "
                                    "received, not yet answered or failed (default 1000)"),
        "max_loop_lag_ms": ((int, float), "enter overload at this event-loop lag, in ms "
                                          "(default 200)"),
        "max_rx_queue_kb": (int, "enter overload at this many KiB waiting in the SIP/UDP "
                                 "sockets' receive queues (default 1024)"),
        "low_water": ((int, float), "leave overload once every input is below this share of "
                                    "its mark (default 0.5)"),
        "retry_after": (int, "seconds in the 503's Retry-After (default 2)"),
        "remember": ((int, float), "seconds a refused INVITE or MESSAGE is remembered, so its "
                                   "retransmissions get the same 503 without new work "
                                   "(default 32)"),
    },
    "messaging": {
        "idle_timeout": ((int, float), "seconds without a message after which a conversation "
                                       "ends; the next message starts a new session "
                                       "(default 14400, 4 hours)"),
        "max_bytes": (int, "largest MESSAGE body accepted, in bytes; larger ones get 413 "
                           "(default 4096)"),
        "auth": (bool, "challenge every MESSAGE for the digest credentials of a [users.NAME] "
                       "(401; default false)"),
    },
    "registrar": {
        "mode": (str, "open, auth or off"),
        "realm": (str, "digest realm"),
        "max_bindings": (int, "bindings in the whole table (default 10000)"),
        "max_contacts": (int, "bindings per address-of-record (default 10)"),
        "rate": ((int, float), "REGISTERs per second per source IP, sustained (default 5)"),
        "burst": (int, "REGISTERs per source IP in a burst (default 50)"),
        "max_auth_failures": (int, "failed digest responses per source IP before a lockout "
                                   "(default 10)"),
        "auth_lockout": ((int, float), "seconds a source IP is refused after that (default 300)"),
    },
    "webhooks": {
        "url": (str, "where signed notifications are POSTed (http:// or https://)"),
        "secret": (str, "HMAC-SHA256 key signing them (at least 16 characters)"),
        "events": (list, "event types sent (default: all; see docs/billing.md)"),
        "max_attempts": (int, "attempts per message before it is kept as failed"),
        "retry_base": ((int, float), "seconds before the first retry (doubles each time)"),
        "retry_max": ((int, float), "longest pause between attempts, seconds"),
        "timeout": ((int, float), "seconds one attempt may take"),
        "low_balance": (str, "funds left below which balance.low is sent, e.g. \"5.00\""),
    },
    "security": _guard.SCHEMA,
    "cluster": {
        "redis": (str, "redis://HOST:PORT/DB of the cluster's session directory (docs/cluster.md; "
                       "default: none, this node stands alone)"),
        "prefix": (str, "prefix of every key this cluster writes in Redis (default \"baton:\")"),
        "directory_ttl": ((int, float), "seconds a node's directory entries outlive it "
                                        "(refreshed every third of it while the call is up; "
                                        "default 30)"),
        "forward": (bool, "forward control requests about another node's session to it "
                          "(default true; false: FAILED_PRECONDITION naming the owner)"),
        "grpc_advertise": (str, "HOST:PORT other nodes reach this node's gRPC API at "
                                "(default: engine.grpc_addr as bound)"),
        "reservations": (str, "postgresql:// URL (the cluster's ledger) prepaid grants and "
                              "capped time are reserved from, so the nodes share each "
                              "prepaid balance and plan cap (default: none)"),
        "slice": (str, "reservations are whole slices of this amount, e.g. \"0.50\" "
                       "(default \"1.00\"): the overspend bound, docs/cluster.md"),
        "reservation_ttl": ((int, float), "seconds a dead node's reservations outlive it "
                                          "(default 60)"),
        "cap_slice": (int, "seconds of a capped module's time (a plan's cap with at_cap = "
                           "\"deny\") reserved from the cluster per grant, renewed while the "
                           "call lasts (default 60)"),
        "shared_quotas": (bool, "count API-key quotas in the cluster's Redis, so they hold "
                                "across nodes; Redis unreachable: API-key calls are refused "
                                "(default true when redis is set; false: each node counts "
                                "alone)"),
    },
}


# The sections made of named entries, as data: table -> (what it is, {key: (type,
# meaning)}); NAME, ID, CODE, NUMBER and NODE stand for any name.  The validators below
# accept exactly these keys, and `baton config reference` (engine/config/doc.py) prints
# them with SCHEMA and the billing keys (engine/accounting/config.py).
TABLES = {
    "users.NAME": ("a SIP user the registrar accepts in `auth` mode", {
        "password": ("string", "the user's digest password (required)"),
    }),
    "accounts.ID": ("a customer account: its numbers, data and credentials", {
        "name": ("string", "display name (default: the ID)"),
        "currency": ("string", "ISO 4217 code the account is billed in (default: billing.currency)"),
        "numbers": ("table", "NUMBER -> what it starts, see accounts.ID.numbers.NUMBER"),
        "kv": ("table", "the account's key/value store, readable by every module"),
        "billing": ("table", "plans, prepaid balance, credit limit: see accounts.ID.billing"),
        "api_tokens": ("list of strings", "bearer tokens for the control API (16+ characters each)"),
        "secret": ("string", "signs requests to instruction apps, X-Baton-Signature (16+ characters)"),
        "twilio_signature": ("bool", "also send X-Twilio-Signature to instruction apps"),
        "sid": ("string", "the AccountSid of the REST API (default: the ID), e.g. AC + 32 hex"),
        "auth_token": ("string", "REST API password with the sid (HTTP Basic), and the key "
                                 "signing its status callbacks, X-Twilio-Signature (16+ characters)"),
        "webhook_url": ("string", "this account's notifications go here instead of webhooks.url"),
        "webhook_secret": ("string", "key signing them (required with webhook_url)"),
        "low_balance": ("string", "funds left below which balance.low is sent for this account"),
        "outbound": ("table", "trunks, destinations and caps of its outbound calls: see "
                              "accounts.ID.outbound (default: deny all but this engine)"),
    }),
    "accounts.ID.numbers.NUMBER": ("a dialled number (the Request-URI's user part) and what it "
                                   "starts; exactly one of app, module, endpoint, instructions; "
                                   "any other key is a parameter of the first module", {
        "app": ("string", "name of an [apps.NAME] to run"),
        "module": ("string", "module code to start in, e.g. baton.hold or acme.survey"),
        "endpoint": ("string", "SIP/tel URI to bridge to, or a number with trunk"),
        "instructions": ("string", "http(s):// URI of an instruction document"),
        "trunk": ("string", "with endpoint: the [trunks.NAME] the number is dialled through"),
        "messaging": ("string or table", "what a text (SIP MESSAGE) to the number starts: an "
                                         "http(s):// instruction URI, an app name, a module "
                                         "code, or { app | module | instructions = ... }; "
                                         "the number's other keys are its first module's "
                                         "params too (under the table's own)"),
    }),
    "apps.NAME": ("an app: nodes (modules with their params) wired by outlets", {
        "start": ("string", "the node a call starts in (required)"),
        "nodes": ("table", "NODE -> node, see apps.NAME.nodes.NODE (at least one)"),
        "vars": ("table", "app-wide variables every module can read"),
        "events": ("table", "app-wide event -> target (node, module code, URI or hangup)"),
    }),
    "apps.NAME.nodes.NODE": ("one step of an app", {
        "module": ("string", "module code (required)"),
        "params": ("table", "the module's parameters, checked at load for built-in modules"),
        "outlets": ("table", "outlet -> target: a node, module code, URI or hangup"),
        "events": ("table", "event -> target, e.g. dialled-hangup"),
    }),
    "modules.CODE": ("where a module code lives: exactly one of vendor, uri or alias", {
        "vendor": ("string", "served by this vendor's processes over gRPC"),
        "level": ("string", "with vendor: the level its time is metered at, basic, "
                            "application or service (default service)"),
        "uri": ("string", "an http(s):// instruction document"),
        "alias": ("string", "another module code this one stands for"),
    }),
    "trunks.NAME": ("an outbound SIP trunk", {
        "proxy": ("string", "HOST:PORT INVITEs are sent to (required)"),
        "transport": ("string", "udp or tcp (default udp)"),
        "username": ("string", "digest user, when the trunk challenges (401/407)"),
        "password": ("string", "digest password"),
        "prefix": ("string", "put before dialled numbers"),
        "domain": ("string", "host part of the Request-URI (default: the proxy host)"),
        "trusted": ("bool", "media is sent to its SDP address at once, before any RTP comes "
                            "from there; no per-source setup limit (default false)"),
        "message_split": ("string", "how a text longer than one carrier segment goes out: "
                                    "segments (one MESSAGE per part of 153 GSM-7 / 67 UCS-2 "
                                    "characters) or none (the whole body in one MESSAGE) "
                                    "(default segments)"),
        "message_max": ("int", "the longest text the trunk takes: parts with message_split = "
                               "segments (default 10), body octets with none (default 1300); "
                               "a longer text fails"),
    }),
    "policy": ("the local policy hook, consulted on every hand-off of control", {
        "deny_modules": ("table", "account -> list of module codes it may not use"),
        "allow_modules": ("table", "account -> the only module codes it may use"),
        "banned_callers": ("list of strings", "a From URI containing one of these is refused"),
        "limits": ("table", "module code -> seconds of control allowed per hand-off"),
        "warn_before": ("number", "prepaid: seconds before the funds run out that the session "
                                  "is warned (default 30, 0: no warning)"),
        "warning_text": ("string", "prepaid: spoken to the caller with the warning (default: "
                                   "nothing spoken)"),
        "warning_voice": ("string", "espeak-ng voice of the spoken warning (default en)"),
        "accounts": ("table", "ACCOUNT -> its own warn_before, warning_text, warning_voice"),
    }),
    "policy.accounts.ID": ("one account's prepaid warning settings", {
        "warn_before": ("number", "seconds (0..3600)"),
        "warning_text": ("string", "spoken to the caller"),
        "warning_voice": ("string", "espeak-ng voice"),
    }),
    "vendors.ID": ("a module vendor: how its processes attach and what it is paid", {
        "name": ("string", "display name on payouts"),
        "secret": ("string", "what its processes present when they attach (16+ characters)"),
        "modules": ("list of strings", "module codes it serves and sells (default: ID.*)"),
        "offer_timeout": ("number", "seconds a process has to take an offered call (0.05..60, default 2)"),
        "revenue_share": ("number or string", "its share of what its modules earn: 0.7, \"0.7\" or \"70%\""),
        "plans": ("table", "listing default plans of its modules: \"MODULE[:ACTION]\" -> plan"),
        "outbound": ("table", "trunks and destinations its dial commands may reach: see "
                              "vendors.ID.outbound (default: deny all but this engine)"),
        "files_dir": ("string", "the only directory its play commands may read "
                                "(default DATA/vendors/ID)"),
    }),
    "plans.NAME": ("a usage plan: what time in control or an action costs (docs/billing.md)", {
        "kind": ("string", "per_unit (default), graduated, volume or subscription"),
        "unit": ("string", "second, minute (default), hour or action"),
        "currency": ("string", "the plan's currency (default USD); must be the account's"),
        "description": ("string", "free text"),
        "price": ("string", "per_unit: price per unit, e.g. \"0.01\" (required)"),
        "increment": ("string or int", "time units: \"FIRST/NEXT\" seconds, e.g. \"60/60\", \"6/6\""),
        "connect_fee": ("string", "time units: added to each segment of control"),
        "minimum": ("string", "per rated line: a smaller amount is raised to it"),
        "cap": ("int or string", "per account, module and period, in base units (\"10m\" for time)"),
        "at_cap": ("string", "beyond the cap: deny (default) or overage"),
        "overage_price": ("string", "with at_cap = \"overage\": price per unit beyond the cap"),
        "tiers": ("list of tables", "graduated, volume: [{up_to, price, unit, flat}, ...]"),
        "tier_scope": ("string", "graduated: tiers count from the session or the period (default)"),
        "fee": ("string", "subscription: fee per period (required)"),
        "unpaid": ("string", "subscription: charge (default) or deny an unpaid period"),
    }),
    "accounts.ID.billing": ("an account's own billing settings", {
        "plans": ("table", "\"MODULE[:ACTION]\" -> plan, before listings and defaults"),
        "prepaid_balance": ("string", "prepaid: the balance is this minus all charges"),
        "credit_limit": ("string", "how far below zero the balance may go"),
        "paid_periods": ("list of strings", "subscription periods paid outside the ledger"),
        "banned": ("bool", "reported to the engine's policy: new calls are refused"),
    }),
    "accounts.ID.outbound": ("what the account's calls may dial (docs/security.md, \"Toll "
                             "fraud\"): deny by default", dict(dialing.KEYS)),
    "vendors.ID.outbound": ("what a vendor's dial commands may reach, on top of the account's",
                            {k: v for k, v in dialing.KEYS.items()
                             if k not in ("max_concurrent", "max_spend_per_hour")}),
    "api_keys.ID": ("a metered key a third-party application calls the control API with", {
        "account": ("string", "the account the key acts for (required)"),
        "token": ("string", "the bearer token (16+ characters); or token_sha256"),
        "token_sha256": ("string", "the SHA-256 of the token, 64 hex digits (sha256sum)"),
        "description": ("string", "free text"),
        "plan": ("string", "a [plans.NAME] pricing each call"),
        "quota": ("integer", "calls allowed per period"),
        "period": ("string", "month or day (UTC); default billing.period"),
        "auto_top_up": ("table", "{ calls = N, price = \"5.00\" } bought when the quota runs out"),
    }),
}


def _known_key(path: str, table: str, key: str, name: str) -> None:
    """A key of one of the TABLES, or a ConfigError listing the known ones."""
    keys = TABLES[table][1]
    if name not in keys:
        raise ConfigError(path, key, f"unknown key (known: {', '.join(sorted(keys))})")


def _check_type(path, key, value, typ):
    if isinstance(typ, tuple):
        if isinstance(value, bool) or not isinstance(value, typ):
            raise ConfigError(path, key, f"expected a number, got {value!r}")
        return
    if typ is int and isinstance(value, bool):
        raise ConfigError(path, key, f"expected an integer, got {value!r}")
    if not isinstance(value, typ):
        raise ConfigError(path, key, f"expected {typ.__name__}, got {type(value).__name__} {value!r}")


def _load_cluster(sect: dict, path: str) -> Cluster:
    c = Cluster(**{k: v for k, v in sect.items()})
    if c.redis and not c.redis.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError(path, "cluster.redis", f"not a Redis URL: {c.redis!r} "
                                                 "(redis://HOST:PORT/DB)")
    for key in ("directory_ttl", "reservation_ttl"):
        setattr(c, key, float(getattr(c, key)))
        if getattr(c, key) <= 0:
            raise ConfigError(path, f"cluster.{key}", "must be a positive number of seconds")
    if c.reservations and not c.reservations.startswith(("postgresql://", "postgres://")):
        raise ConfigError(path, "cluster.reservations", "a postgresql:// URL")
    if c.cap_slice <= 0:
        raise ConfigError(path, "cluster.cap_slice", "must be a positive number of seconds")
    if c.slice_micro() <= 0:
        raise ConfigError(path, "cluster.slice", f"a positive amount such as \"1.00\", "
                                                 f"not {c.slice!r}")
    if c.grpc_advertise:
        try:
            parse_hostport(c.grpc_advertise, 50051)
        except ValueError as exc:
            raise ConfigError(path, "cluster.grpc_advertise", str(exc)) from None
    return c


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
    known = set(SCHEMA) | {"users", "accounts", "apps", "trunks", "modules", "policy",
                           "billing", "plans", "vendors", "call_center", "api_keys"}
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
    if "http_addr" in eng:
        try:
            parse_hostport(eng["http_addr"], 8080)
        except ValueError as exc:
            raise ConfigError(path, "engine.http_addr", str(exc)) from None
        cfg.http_addr = eng["http_addr"]
    cfg.grpc_addr = eng.get("grpc_addr", cfg.grpc_addr)
    try:
        parse_hostport(cfg.grpc_addr, 50051)
    except ValueError as exc:
        raise ConfigError(path, "engine.grpc_addr", str(exc)) from None
    cfg.data_dir = eng.get("data_dir", cfg.data_dir)
    cfg.node_id = eng.get("node_id", cfg.node_id)
    cfg.drain_timeout = float(eng.get("drain_timeout", 0))
    if cfg.drain_timeout < 0:
        raise ConfigError(path, "engine.drain_timeout", "must be 0 or more seconds")
    cfg.user_agent = eng.get("user_agent", "")
    cfg.log_level = eng.get("log_level", "info")
    if cfg.log_level not in ("debug", "info", "warning", "error"):
        raise ConfigError(path, "engine.log_level", f"unknown level {cfg.log_level!r}")
    cfg.log_format = eng.get("log_format", "text")
    if cfg.log_format not in ("text", "json"):
        raise ConfigError(path, "engine.log_format", f"must be text or json, not {cfg.log_format!r}")
    for key in ("metrics_addr", "accountant_metrics_addr"):
        value = eng.get(key) or ""
        if value:
            try:
                parse_hostport(value, 9090)
            except ValueError as exc:
                raise ConfigError(path, f"engine.{key}", f"{exc} (expected HOST:PORT, "
                                                         "e.g. 127.0.0.1:9090)") from None
        setattr(cfg, key, value)

    media = raw.get("media", {})
    cfg.media_address = (overrides or {}).get("media_address") or media.get("address", cfg.advertise)
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

    cfg.cluster = _load_cluster(raw.get("cluster", {}), path)
    for key in ("redis", "prefix", "reservations"):
        if (overrides or {}).get(f"cluster_{key}"):
            setattr(cfg.cluster, key, overrides[f"cluster_{key}"])
    try:
        cfg.guard = _guard.load(raw)
    except ValueError as exc:
        raise ConfigError(path, *exc.args) from None

    reg = raw.get("registrar", {})
    cfg.registrar_mode = reg.get("mode", "open")
    if cfg.registrar_mode not in ("open", "auth", "off"):
        raise ConfigError(path, "registrar.mode", f"must be open, auth or off, not {cfg.registrar_mode!r}")
    cfg.realm = reg.get("realm", "baton")
    for key in ("max_bindings", "max_contacts", "rate", "burst", "max_auth_failures",
                "auth_lockout"):
        if key in reg:
            if reg[key] <= 0:
                raise ConfigError(path, f"registrar.{key}", "must be positive")
            cfg.registrar_limits[key] = reg[key]
    msg = raw.get("messaging", {})
    cfg.messaging = {"idle_timeout": 14400.0, "max_bytes": 4096, "auth": False}
    for key in ("idle_timeout", "max_bytes"):
        if key in msg:
            if isinstance(msg[key], bool) or msg[key] <= 0:
                raise ConfigError(path, f"messaging.{key}", "must be positive")
            cfg.messaging[key] = msg[key]
    if "auth" in msg:
        cfg.messaging["auth"] = msg["auth"]
    sip = raw.get("sip", {})
    for key in ("tcp_idle_timeout", "tcp_max_connections", "tcp_max_per_source"):
        if key in sip:
            if sip[key] <= 0:
                raise ConfigError(path, f"sip.{key}", "must be positive")
            cfg.tcp_limits[key.removeprefix("tcp_")] = sip[key]
    if "udp_rcvbuf" in sip:
        if sip["udp_rcvbuf"] <= 0:
            raise ConfigError(path, "sip.udp_rcvbuf", "must be positive")
        cfg.udp_rcvbuf = sip["udp_rcvbuf"]
    ov = raw.get("overload", {})
    for key, value in ov.items():
        if key == "enabled":
            cfg.overload[key] = value
            continue
        if value <= 0 or (key == "low_water" and value >= 1):
            raise ConfigError(path, f"overload.{key}",
                              "must be between 0 and 1" if key == "low_water" else "must be positive")
        cfg.overload[key] = value

    users = raw.get("users", {})
    if not isinstance(users, dict):
        raise ConfigError(path, "users", "expected a table of users")
    for name, u in users.items():
        if not isinstance(u, dict) or not isinstance(u.get("password"), str) or not u["password"]:
            raise ConfigError(path, f"users.{name}.password", "a non-empty string is required")
        cfg.users[name] = u["password"]

    _load_modules(cfg, raw, path)
    _load_trunks(cfg, raw, path)
    _load_apps(cfg, raw, path)
    _load_policy(cfg, raw, path)
    _check_vendors(cfg, raw, path)
    from engine.common.webhooks import check_config as _check_webhooks

    _check_webhooks(raw, path)
    accounts = raw.get("accounts", {})
    if not isinstance(accounts, dict):
        raise ConfigError(path, "accounts", "expected a table of accounts")
    for acc_id, acc in accounts.items():
        key = f"accounts.{acc_id}"
        if not isinstance(acc, dict):
            raise ConfigError(path, key, "expected a table")
        a = Account(id=acc_id, name=acc.get("name", acc_id), currency=acc.get("currency", "USD"))
        for k in acc:
            _known_key(path, "accounts.ID", f"{key}.{k}", k)
        if "secret" in acc and (not isinstance(acc["secret"], str) or len(acc["secret"]) < 16):
            raise ConfigError(path, f"{key}.secret", "a string of at least 16 characters "
                                                     "(signs requests to instruction apps)")
        if "twilio_signature" in acc and not isinstance(acc["twilio_signature"], bool):
            raise ConfigError(path, f"{key}.twilio_signature", "true or false")
        if "auth_token" in acc and (not isinstance(acc["auth_token"], str)
                                    or len(acc["auth_token"]) < 16):
            raise ConfigError(path, f"{key}.auth_token", "a string of at least 16 characters")
        if "sid" in acc and (not isinstance(acc["sid"], str)
                             or not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", acc["sid"])):
            raise ConfigError(path, f"{key}.sid", "letters, digits, _ and - (at most 64)")
        tokens = acc.get("api_tokens", [])
        if not isinstance(tokens, list) or not all(isinstance(t, str) and len(t) >= 16 for t in tokens):
            raise ConfigError(path, f"{key}.api_tokens", "a list of tokens of at least 16 characters")
        a.api_tokens = list(tokens)
        a.outbound = _outbound(cfg, acc.get("outbound", {}), path, f"{key}.outbound")
        kv = acc.get("kv", {})
        if not isinstance(kv, dict):
            raise ConfigError(path, f"{key}.kv", "expected a table of values")
        a.kv = dict(kv)
        numbers = acc.get("numbers", {})
        if not isinstance(numbers, dict):
            raise ConfigError(path, f"{key}.numbers", "expected a table of number = { module = ... }")
        for number, target in numbers.items():
            nkey = f"{key}.numbers.{number}"
            owner = cfg.numbers.get(number) or cfg.messaging_numbers.get(number)
            if owner is not None:
                raise ConfigError(path, nkey, f"number already belongs to account {owner.account!r}")
            texting = None
            if isinstance(target, dict) and "messaging" in target:
                target = dict(target)
                # The entry's other keys are the number's params: the messaging
                # module gets them as the voice one does (its own table's win).
                extra = {k: v for k, v in target.items()
                         if k not in TARGET_KINDS and k != "messaging"}
                texting = _messaging_route(cfg, path, f"{nkey}.messaging", acc_id, number,
                                           target.pop("messaging"), extra)
                cfg.messaging_numbers[number] = texting
                if not any(k in target for k in TARGET_KINDS):
                    continue        # a number for texts only
            route = _number_route(cfg, path, nkey, acc_id, number, target)
            a.numbers[number] = route
            cfg.numbers[number] = route
        cfg.accounts[acc_id] = a
    _load_call_center(cfg, raw, path)
    from engine.config.api_keys import load_api_keys

    cfg.api_keys = load_api_keys(raw, path)
    cfg.operator_tokens = _operator_tokens(cfg, eng.get("operator_tokens", []), path)
    if overrides and overrides.get("data_dir"):
        cfg.data_dir = overrides["data_dir"]
    cfg.data_dir = os.path.abspath(cfg.data_dir)
    return cfg


def _load_call_center(cfg: Config, raw: dict, path: str) -> None:
    """`[call_center]` agents and queues, and the nodes and numbers that name them."""
    from engine.modules.services.call_center import check_routes, load_config

    try:
        base = os.path.dirname(os.path.abspath(path)) if os.path.exists(path) else ""
        cfg.call_center = load_config(raw.get("call_center", {}), cfg.users, cfg.accounts,
                                      cfg.registrar_mode, base)
    except ValueError as exc:
        key, _, problem = str(exc).partition(": ")
        raise ConfigError(path, key if key == "call_center" else f"call_center.{key}",
                          problem) from None
    try:
        check_routes(cfg.call_center, cfg.apps, cfg.numbers)
    except ValueError as exc:
        key, _, problem = str(exc).partition(": ")
        raise ConfigError(path, key, problem) from None


def _known_code(cfg: Config, code: str) -> bool:
    from engine.modules.catalog import builtin_codes

    return code in builtin_codes() or code in cfg.modules


def _load_modules(cfg: Config, raw: dict, path: str) -> None:
    mods = raw.get("modules", {})
    if not isinstance(mods, dict):
        raise ConfigError(path, "modules", "expected a table of module codes")
    for code, entry in mods.items():
        key = f"modules.{code}"
        if "." not in code:
            raise ConfigError(path, key, "a module code has a vendor prefix, e.g. acme.survey")
        if not isinstance(entry, dict) or len(set(entry) & {"alias", "uri", "vendor"}) != 1:
            raise ConfigError(path, key, "needs exactly one of alias, uri or vendor")
        if "uri" in entry and not str(entry["uri"]).startswith(("http://", "https://")):
            raise ConfigError(path, f"{key}.uri", "must be an http:// or https:// URI")
        if entry.get("level", "service") not in ("basic", "application", "service"):
            raise ConfigError(path, f"{key}.level", "basic, application or service")
        cfg.modules[code] = dict(entry)


def _load_trunks(cfg: Config, raw: dict, path: str) -> None:
    trunks = raw.get("trunks", {})
    if not isinstance(trunks, dict):
        raise ConfigError(path, "trunks", "expected a table of trunks")
    for name, t in trunks.items():
        key = f"trunks.{name}"
        if not isinstance(t, dict) or not isinstance(t.get("proxy"), str):
            raise ConfigError(path, f"{key}.proxy", "a proxy HOST:PORT is required")
        try:
            host, port = parse_hostport(t["proxy"])
        except ValueError as exc:
            raise ConfigError(path, f"{key}.proxy", str(exc)) from None
        for k in t:
            _known_key(path, "trunks.NAME", f"{key}.{k}", k)
        transport = t.get("transport", "udp").lower()
        if transport not in ("udp", "tcp"):
            raise ConfigError(path, f"{key}.transport", "udp or tcp")
        split = t.get("message_split", "segments")
        if split not in ("segments", "none"):
            raise ConfigError(path, f"{key}.message_split", "segments or none")
        # RFC 3428 6: a MESSAGE outside a congestion-controlled transport stays
        # under 1300 octets unless the path MTU is known to be larger.
        most = t.get("message_max", 10 if split == "segments" else 1300)
        if isinstance(most, bool) or not isinstance(most, int) or not 1 <= most <= 65536:
            raise ConfigError(path, f"{key}.message_max", "a whole number from 1 to 65536")
        cfg.trunks[name] = Trunk(name, host, port, transport, t.get("username", ""),
                                 t.get("password", ""), t.get("prefix", ""),
                                 t.get("domain", "") or host, t.get("trusted", False) is True,
                                 split, most)


def _check_target(cfg: Config, path: str, key: str, target, app_nodes) -> None:
    from engine.sessions.apps import HANGUP, adhoc_node

    if not isinstance(target, str) or not target:
        raise ConfigError(path, key, "a target is a node name, module code, URI or 'hangup'")
    if target == HANGUP or target in app_nodes:
        return
    node = adhoc_node(target)
    if node is None:
        raise ConfigError(path, key, f"{target!r} is neither a node of this app nor a module code or URI")
    if node.module.startswith("baton.") and not _known_code(cfg, node.module):
        raise ConfigError(path, key, f"unknown module {node.module!r}")


def _load_apps(cfg: Config, raw: dict, path: str) -> None:
    from engine.sessions.apps import App, Node
    from engine.modules.catalog import builtin_modules

    apps = raw.get("apps", {})
    if not isinstance(apps, dict):
        raise ConfigError(path, "apps", "expected a table of apps")
    for name, a in apps.items():
        key = f"apps.{name}"
        if not isinstance(a, dict):
            raise ConfigError(path, key, "expected a table")
        for k in a:
            _known_key(path, "apps.NAME", f"{key}.{k}", k)
        nodes = a.get("nodes", {})
        if not isinstance(nodes, dict) or not nodes:
            raise ConfigError(path, f"{key}.nodes", "an app needs at least one node")
        start = a.get("start")
        if start not in nodes:
            raise ConfigError(path, f"{key}.start", f"must name one of its nodes ({', '.join(nodes)})")
        app = App(name=name, start=start, vars=dict(a.get("vars", {})),
                  events=dict(a.get("events", {})))
        for nname, n in nodes.items():
            nkey = f"{key}.nodes.{nname}"
            if not isinstance(n, dict) or not isinstance(n.get("module"), str):
                raise ConfigError(path, f"{nkey}.module", "each node needs a module code")
            for k in n:
                _known_key(path, "apps.NAME.nodes.NODE", f"{nkey}.{k}", k)
            code = n["module"]
            if "." not in code or (code.startswith("baton.") and not _known_code(cfg, code)):
                raise ConfigError(path, f"{nkey}.module", f"unknown module {code!r}")
            for sect in ("params", "outlets", "events"):
                if not isinstance(n.get(sect, {}), dict):
                    raise ConfigError(path, f"{nkey}.{sect}", "expected a table")
            _check_params(path, nkey, code, n.get("params", {}))
            node = Node(nname, n["module"], dict(n.get("params", {})),
                        {str(k): v for k, v in n.get("outlets", {}).items()},
                        dict(n.get("events", {})), app)
            app.nodes[nname] = node
        for nname, node in app.nodes.items():
            for sect, table in (("outlets", node.outlets), ("events", node.events)):
                for o, target in table.items():
                    _check_target(cfg, path, f"{key}.nodes.{nname}.{sect}.{o}", target, app.nodes)
        for nname, node in app.nodes.items():
            # Targets a module names in its params (a phone tree's choices): a wired
            # outlet of the node, else checked like an outlet's target.
            targets = getattr(builtin_modules().get(node.module), "targets", None)
            for pkey, target in (targets(node.params) if targets is not None else ()):
                if target not in node.outlets:
                    _check_target(cfg, path, f"{key}.nodes.{nname}.params.{pkey}", target,
                                  app.nodes)
        for ev, target in app.events.items():
            _check_target(cfg, path, f"{key}.events.{ev}", target, app.nodes)
        cfg.apps[name] = app


def _check_params(path: str, nkey: str, code: str, params: dict, sub: str = ".params") -> None:
    """A built-in module's own check of a node's params (Module.check_params);
    `sub` is where the params stand under `nkey` ("" for a number's route,
    whose params are the route table's other keys)."""
    from engine.modules.catalog import builtin_modules

    cls = builtin_modules().get(code)
    if cls is None:
        return
    try:
        cls.check_params(dict(params))
    except (ValueError, TypeError) as exc:
        text = str(exc)
        head, sep, rest = text.partition(": ")
        if sep and head and " " not in head:
            raise ConfigError(path, f"{nkey}{sub}.{head}", rest) from None
        raise ConfigError(path, f"{nkey}{sub}", text) from None


def _load_policy(cfg: Config, raw: dict, path: str) -> None:
    pol = raw.get("policy", {})
    if not isinstance(pol, dict):
        raise ConfigError(path, "policy", "expected a table")
    for k in pol:
        _known_key(path, "policy", f"policy.{k}", k)
    _check_warning(pol, path, "policy")
    per = pol.get("accounts", {})
    if not isinstance(per, dict):
        raise ConfigError(path, "policy.accounts", "expected a table of ACCOUNT = "
                                                   "{ warn_before = ..., warning_text = ... }")
    for acc, table in per.items():
        key = f"policy.accounts.{acc}"
        if not isinstance(table, dict):
            raise ConfigError(path, key, "expected a table { warn_before = ..., warning_text = ... }")
        for k in table:
            _known_key(path, "policy.accounts.ID", f"{key}.{k}", k)
        _check_warning(table, path, key)
    cfg.policy = dict(pol)


def _check_warning(table: dict, path: str, where: str) -> None:
    """The prepaid warning keys: seconds before the limit, and what is spoken."""
    v = table.get("warn_before")
    if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or
                          not 0 <= v <= 3600):
        raise ConfigError(path, f"{where}.warn_before",
                          f"seconds from 0 (no warning) to 3600, not {v!r}")
    for k in ("warning_text", "warning_voice"):
        v = table.get(k)
        if v is not None and (not isinstance(v, str) or len(v) > 500):
            raise ConfigError(path, f"{where}.{k}", "a string of at most 500 characters")


def _number_route(cfg: Config, path: str, key: str, account: str, number: str, target) -> NumberRoute:
    if isinstance(target, str):
        target = {"module": target}
    if not isinstance(target, dict):
        raise ConfigError(path, key, "expected a table such as { module = \"baton.hold\" }")
    kinds = [k for k in TARGET_KINDS if k in target]
    if len(kinds) != 1:
        raise ConfigError(path, key, f"needs exactly one of {', '.join(TARGET_KINDS)}")
    kind = kinds[0]
    value = target[kind]
    if not isinstance(value, str) or not value:
        raise ConfigError(path, f"{key}.{kind}", "must be a non-empty string")
    params = {k: v for k, v in target.items() if k != kind}
    if kind == "module" and not _known_code(cfg, value):
        from engine.modules.catalog import builtin_codes

        known = ", ".join(sorted(set(builtin_codes()) | set(cfg.modules)))
        raise ConfigError(path, f"{key}.module", f"unknown module {value!r} (known: {known})")
    if kind == "module":
        # The same check as an app node's params: a bad number route fails at start.
        _check_params(path, key, value, params, sub="")
    if kind == "app" and value not in cfg.apps:
        raise ConfigError(path, f"{key}.app", f"no app {value!r} (apps: {', '.join(cfg.apps) or 'none'})")
    if kind == "instructions" and not value.startswith(("http://", "https://")):
        raise ConfigError(path, f"{key}.instructions", "must be an http:// or https:// URI")
    if kind == "endpoint":
        if not value.startswith(("sip:", "sips:", "tel:")) and "trunk" not in params:
            raise ConfigError(path, f"{key}.endpoint", "a SIP URI, or a number with trunk = NAME")
        if "trunk" in params and params["trunk"] not in cfg.trunks:
            raise ConfigError(path, f"{key}.trunk", f"no trunk {params['trunk']!r}")
    return NumberRoute(number=number, account=account, kind=kind, target=value, params=params)


def _messaging_route(cfg: Config, path: str, key: str, account: str, number: str,
                     target, extra: dict | None = None) -> NumberRoute:
    """A number's `messaging` target: the kinds a call's target has, but an endpoint.
    `extra`: the number entry's other keys, params under the target table's own."""
    if isinstance(target, str):
        if target.startswith(("http://", "https://")):
            target = {"instructions": target}
        elif target in cfg.apps:
            target = {"app": target}
        else:
            target = {"module": target}
    if isinstance(target, dict) and "endpoint" in target:
        raise ConfigError(path, f"{key}.endpoint", "texts start an app, a module or an "
                                                   "instruction URI")
    if isinstance(target, dict) and extra:
        target = {**extra, **target}
    route = _number_route(cfg, path, key, account, number, target)
    if route.kind == "module":
        from engine.modules.catalog import builtin_modules

        cls = builtin_modules().get(route.target)
        if cls is not None and not getattr(cls, "texting", False):
            raise ConfigError(path, f"{key}.module", f"module {route.target!r} does not take "
                                                     f"text conversations")
    return route


def _check_vendors(cfg: Config, raw: dict, path: str) -> None:
    """The parts of `[vendors.ID]` the control API relies on (billing reads the rest)."""
    vendors = raw.get("vendors", {})
    if not isinstance(vendors, dict):
        raise ConfigError(path, "vendors", "expected a table of vendors")
    for vid, v in vendors.items():
        key = f"vendors.{vid}"
        if not isinstance(v, dict):
            raise ConfigError(path, key, "expected a table")
        if "secret" in v and (not isinstance(v["secret"], str) or len(v["secret"]) < 16):
            raise ConfigError(path, f"{key}.secret", "a string of at least 16 characters")
        mods = v.get("modules", [])
        if not isinstance(mods, list) or not all(isinstance(m, str) and "." in m for m in mods):
            raise ConfigError(path, f"{key}.modules", "a list of module codes such as acme.survey")
        t = v.get("offer_timeout", 2.0)
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.05 <= t <= 60:
            raise ConfigError(path, f"{key}.offer_timeout", "seconds between 0.05 and 60")
        if "files_dir" in v and not (isinstance(v["files_dir"], str) and v["files_dir"].startswith("/")):
            raise ConfigError(path, f"{key}.files_dir", "an absolute directory path")
        cfg.vendor_outbound[vid] = _outbound(cfg, v.get("outbound", {}), path,
                                             f"{key}.outbound", account=False)


def _outbound(cfg: Config, table, path: str, where: str, account: bool = True):
    """An `outbound` table (sessions/dialing.py); its trunks must exist."""
    try:
        perm = dialing.parse(table, where, account)
    except ValueError as exc:
        key, _, problem = str(exc).partition(": ")
        raise ConfigError(path, key, problem) from None
    for name in sorted(perm.trunks):
        if name not in cfg.trunks:
            raise ConfigError(path, f"{where}.trunks", f"no trunk {name!r}")
    return perm


MIN_OPERATOR_TOKEN = 32


def _operator_tokens(cfg: Config, tokens: list, path: str) -> list:
    """`engine.operator_tokens`: long, distinct, and no account's or API key's token
    (a token must say unambiguously who calls)."""
    key = "engine.operator_tokens"
    seen: set = set()
    for i, t in enumerate(tokens):
        if not isinstance(t, str) or len(t) < MIN_OPERATOR_TOKEN or t != t.strip():
            raise ConfigError(path, f"{key}[{i}]", f"a token of at least {MIN_OPERATOR_TOKEN} "
                                                   "characters, without surrounding spaces")
        if t in seen:
            raise ConfigError(path, f"{key}[{i}]", "listed twice")
        seen.add(t)
        for acc in cfg.accounts.values():
            if t in acc.api_tokens:
                raise ConfigError(path, f"{key}[{i}]",
                                  f"is also an api_tokens entry of account {acc.id!r}")
        from engine.config.api_keys import token_digest

        digest = token_digest(t)
        for k in cfg.api_keys.values():
            if k.digest == digest:
                raise ConfigError(path, f"{key}[{i}]", f"is also the token of api_keys.{k.id}")
    return list(tokens)
