"""RFC 4475 SIP torture messages, sent over UDP to a real `baton serve`.

Every file of tests/data/rfc4475 is sent byte-exact, as one datagram, to the
engine started with the demo config (number 1000 is the only number, the
registrar is open). The expected reaction of a UAS per file is the table of
tests/data/rfc4475/README.md; the "process normally" rows are made precise
below for what the demo config serves.

The messages name foreign hosts (example.com, 192.0.2.x, 255.255.255.255),
so engine and peer run inside a network namespace that has only `lo`: a bug
cannot send anything off the machine, and a packet socket in the peer sees
every datagram the engine sends, whichever loopback port it goes to.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import sys
import time
from typing import Callable

import pytest

from tests.helpers import DEMO, EngineProcess
from tests.netns import Netns, NetnsUnavailable

pytestmark = pytest.mark.netns

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "data", "rfc4475")
PEER = os.path.join(HERE, "netns_peer.py")
ENGINE = "127.0.0.1:5070"
ENGINE_SRC = ["127.0.0.1", 5070]


def torture_files() -> dict:
    out = {}
    for sub in ("valid", "invalid"):
        d = os.path.join(DATA, sub)
        if os.path.isdir(d):
            for fn in sorted(os.listdir(d)):
                if fn.endswith(".dat"):
                    out[fn[:-4]] = os.path.join(d, fn)
    return out


FILES = torture_files()

# -- reading messages, independently of the engine's parser ------------------
COMPACT = {"i": "call-id", "v": "via", "t": "to", "f": "from", "m": "contact",
           "l": "content-length", "c": "content-type", "k": "supported"}


class Msg:
    """Start line and unfolded header fields (names canonical lower case)."""

    def __init__(self, start: str, fields: list):
        self.start = start
        self.fields = [(COMPACT.get(n.strip().lower(), n.strip().lower()), v.strip())
                       for n, v in fields]
        parts = start.split(" ", 2)
        self.status = int(parts[1]) if start.startswith("SIP/") and parts[1:2] and \
            parts[1].isdigit() else None
        self.method = None if start.startswith("SIP/") else parts[0]

    @classmethod
    def from_bytes(cls, data: bytes) -> "Msg":
        # The first header block only: for dblreq that is the REGISTER, and
        # the INVITE after it is not part of the message (RFC 4475 3.1.1.8).
        head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1")
        lines = head.split("\r\n")
        fields = []
        for ln in lines[1:]:
            if ln[:1] in (" ", "\t") and fields:
                fields[-1][1] += " " + ln.strip()
            elif ln:
                name, _, value = ln.partition(":")
                fields.append([name, value])
        return cls(lines[0], fields)

    def values(self, name: str) -> list:
        return [v for n, v in self.fields if n == name]

    def first(self, name: str):
        v = self.values(name)
        return v[0] if v else None


def split_commas(values: list) -> list:
    return [item.strip() for v in values for item in v.split(",") if item.strip()]


def lws(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def cseq_of(value: str):
    parts = lws(value).split(" ")
    return (int(parts[0]), parts[1]) if len(parts) == 2 and parts[0].isdigit() else lws(value)


def via_params(value: str) -> dict:
    """Parameters of the first Via value (`branch`, `received`, ...)."""
    first = lws(value).split(",")[0]
    out = {}
    for p in first.split(";")[1:]:
        k, _, v = p.partition("=")
        out[k.strip().lower()] = v.strip()
    return out


def via_host(value: str) -> str:
    m = re.match(r"SIP\s*/\s*[^/]+/\s*\S+\s+([^;:,\s]+)", lws(value), re.I)
    return m.group(1).lower() if m else ""


def has_tag(value: str) -> bool:
    return re.search(r";\s*tag\s*=\s*[^;\s,]+", value, re.I) is not None


def bound_uris(resp: Msg) -> list:
    # RFC 3261 10.3 step 8: a 200 to REGISTER lists every current binding in Contact.
    return [u for v in resp.values("contact") for u in re.findall(r"<([^>]*)>", v)]


# -- expectations -------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Expect:
    section: str
    statuses: tuple            # acceptable final statuses; () = nothing may come back
    why: str
    port: int = 5060           # where the answer must arrive (RFC 3261 18.2.2)
    check: Callable | None = None   # further assertions on the final response


def accept_text_plain(resp: Msg, req: Msg) -> None:
    assert "text/plain" in resp.values("accept"), resp.values("accept")


def allow_with_405(resp: Msg, req: Msg) -> None:
    # RFC 3261 8.2.1: a 405 MUST list the supported methods in Allow.
    if resp.status == 405:
        assert split_commas(resp.values("allow")), "405 without Allow"


def unsupported_lists_require(resp: Msg, req: Msg) -> None:
    # RFC 3261 8.2.2.3: Unsupported lists the Require tags; a UAS ignores
    # Proxy-Require, which only proxies act on (RFC 4475 3.3.5).
    assert set(split_commas(resp.values("unsupported"))) == \
        set(split_commas(req.values("require"))), resp.values("unsupported")


def accept_lists_sdp(resp: Msg, req: Msg) -> None:
    # RFC 3261 8.2.3: a 415 MUST say in Accept what the UAS does take.
    accept = [a.split(";")[0].strip().lower() for a in split_commas(resp.values("accept"))]
    assert "application/sdp" in accept, resp.values("accept")


def digest_challenge(resp: Msg, req: Msg) -> None:
    # RFC 3261 22.4 / RFC 4475 3.3.7: an unknown scheme gets a fresh challenge
    # in a scheme the server does know.
    challenges = resp.values("www-authenticate")
    assert any(c.lower().startswith("digest ") and "realm=" in c and "nonce=" in c
               for c in challenges), challenges


def binds(*uris: str, absent: str | None = None) -> Callable:
    def check(resp: Msg, req: Msg) -> None:
        got = bound_uris(resp)
        for uri in uris:
            assert uri in got, f"binding {uri} not in the 200's Contact {got}"
        if absent:
            assert not any(absent in u for u in got), \
                f"{absent!r} must not be a URI parameter of a binding: {got}"
    return check


def binds_if_accepted(*uris: str) -> Callable:
    inner = binds(*uris)

    def check(resp: Msg, req: Msg) -> None:
        if resp.status == 200:
            inner(resp, req)
    return check


def same_vias(resp: Msg, req: Msg) -> None:
    # RFC 3261 8.2.6.2: every Via, in order, whatever spelling carried it.
    want = [via_host(v) for v in split_commas(req.values("via"))]
    got = [via_host(v) for v in split_commas(resp.values("via"))]
    assert got == want, f"Via hosts {got} != {want}"


# "Normal" processing by the demo config: INVITE to anything but 1000 is 404
# (RFC 3261 21.4.5); OPTIONS is answered by the UAS itself with 200
# (RFC 3261 11.2); REGISTER to the open registrar is 200 listing the
# bindings (RFC 3261 10.3); MESSAGE takes text/plain only (RFC 3428): 415 with Accept.
EXPECT = {
    # 3.1.1: valid messages, a parser must accept them.
    "wsinv": Expect("3.1.1.1", (481,), "the To carries a tag, so this is a mid-dialog INVITE "
                    "for a dialog that does not exist (RFC 3261 12.2.2)"),
    "intmeth": Expect("3.1.1.2", (501, 405), "unknown method (RFC 3261 8.2.1)",
                      check=allow_with_405),
    "esc01": Expect("3.1.1.3", (404,), "INVITE; the user part unescapes to "
                    "'sips:user@example.com', which is not a configured number"),
    "escnull": Expect("3.1.1.4", (200,), "REGISTER; escaped NULs stay escaped in the bindings",
                      check=binds("sip:%00@host5.example.com", "sip:%00%00@host5.example.com")),
    "esc02": Expect("3.1.1.5", (501, 405), "RE%47IST%45R is not REGISTER: methods are never "
                    "unescaped, and an unknown method gets 501", check=allow_with_405),
    "lwsdisp": Expect("3.1.1.6", (200,), "OPTIONS"),
    "longreq": Expect("3.1.1.7", (404,), "INVITE to 'user'; all 34 Via come back in order",
                      check=same_vias),
    "dblreq": Expect("3.1.1.8", (200,), "the REGISTER only; the INVITE after Content-Length "
                     "is not part of the datagram's message",
                     check=binds("sip:j.user@host.example.com")),
    "semiuri": Expect("3.1.1.9", (200,), "OPTIONS; ';' in the user part is not a parameter"),
    "transports": Expect("3.1.1.10", (200,), "OPTIONS; unknown transports in lower Vias"),
    "mpart01": Expect("3.1.1.11", (415,), "a multipart/mixed MESSAGE: the pager takes "
                      "text/plain only and says so (RFC 3428 7, RFC 3261 21.4.13)",
                      check=accept_text_plain),
    "unreason": Expect("3.1.1.12", (), "a response matching no transaction is dropped "
                       "(RFC 3261 18.1.2); nothing is sent back for a response"),
    "noreason": Expect("3.1.1.13", (), "a response matching no transaction is dropped"),
    # 3.1.2: invalid messages.
    "badinv01": Expect("3.1.2.1", (400,), "extraneous header separators"),
    "clerr": Expect("3.1.2.2", (400,), "Content-Length larger than the datagram"),
    "ncl": Expect("3.1.2.3", (400,), "negative Content-Length"),
    "scalar02": Expect("3.1.2.4", (400,), "overlarge CSeq, Max-Forwards, Expires"),
    "scalarlg": Expect("3.1.2.5", (), "a response with overlarge scalars is dropped"),
    "quotbal": Expect("3.1.2.6", (400,), "unterminated quoted string; the top Via names "
                      "port 5050, so the answer goes to the source address at 5050", port=5050),
    "ltgtruri": Expect("3.1.2.7", (400,), "<> around the Request-URI"),
    "lwsruri": Expect("3.1.2.8", (400,), "LWS inside the Request-URI"),
    "lwsstart": Expect("3.1.2.9", (400,), "several SP between Request-Line elements"),
    "trws": Expect("3.1.2.10", (400,), "SP after the SIP-Version"),
    "escruri": Expect("3.1.2.11", (400, 404), "escaped headers in the Request-URI: 400, or "
                      "tolerated as an INVITE to the unknown 'user'"),
    "baddate": Expect("3.1.2.12", (400, 404), "bad Date: 400, or the Date ignored and the "
                      "INVITE to 'user' answered"),
    "regbadct": Expect("3.1.2.13", (400, 200), "Contact URI with a header outside <>: 400, or "
                       "the brackets inferred and the whole URI bound",
                       check=binds_if_accepted(
                           "sip:user@example.com?Route=%3Csip:sip.example.com%3E")),
    "badaspec": Expect("3.1.2.14", (400, 200), "spaces inside an addr-spec: 400 or OPTIONS 200"),
    "baddn": Expect("3.1.2.15", (400, 200), "non-token display names: 400 or OPTIONS 200"),
    "badvers": Expect("3.1.2.16", (505,), "SIP/7.0 (RFC 3261 8.2 / 21.5.7)"),
    "mismatch01": Expect("3.1.2.17", (400,), "CSeq method differs from the Request-Line's"),
    "mismatch02": Expect("3.1.2.18", (400,), "unknown method, CSeq method differs: the "
                         "mismatch is found before the method is judged"),
    "bigcode": Expect("3.1.2.19", (), "a response with a code over 699 is dropped"),
    # 3.2: transaction layer.
    "badbranch": Expect("3.2.1", (200,), "OPTIONS; a branch of only the magic cookie is "
                        "matched the RFC 2543 way"),
    # 3.3: application layer semantics.
    "insuf": Expect("3.3.1", (400,), "To, From, Call-ID and Max-Forwards missing"),
    "unkscm": Expect("3.3.2", (416,), "unknown Request-URI scheme (RFC 3261 8.2.2.1)"),
    "novelsc": Expect("3.3.3", (416,), "soap.beep: a scheme Baton does not serve"),
    "unksm2": Expect("3.3.4", (400,), "a well-formed REGISTER whose To is not a SIP or SIPS "
                     "URI: a registrar rejects it with 400, since the To is the AOR"),
    "bext01": Expect("3.3.5", (420,), "unknown option tags in Require",
                     check=unsupported_lists_require),
    "invut": Expect("3.3.6", (415,), "unknown Content-Type", check=accept_lists_sdp),
    "regaut01": Expect("3.3.7", (401,), "unknown Authorization scheme", check=digest_challenge),
    "multi01": Expect("3.3.8", (400,), "several values in single-value header fields"),
    "mcl01": Expect("3.3.9", (400,), "two Content-Length values"),
    "bcast": Expect("3.3.10", (), "a 200 with a broadcast Via matches no transaction; nothing "
                    "may go toward 255.255.255.255"),
    "zeromf": Expect("3.3.11", (200, 483), "Max-Forwards 0 on an OPTIONS the UAS answers "
                     "itself: 200 (483 would be for what it forwards)"),
    "cparam01": Expect("3.3.12", (200,), "'unknownparam' is a contact-param, not a URI "
                       "parameter of the binding",
                       check=binds("sip:+19725552222@gw1.example.net", absent="unknownparam")),
    "cparam02": Expect("3.3.13", (200,), "'unknownparam' is a URI parameter of the binding",
                       check=binds("sip:+19725552222@gw1.example.net;unknownparam")),
    "regescrt": Expect("3.3.14", (200,), "the escaped Route header stays in the bound URI",
                       check=binds("sip:user@example.com?Route=%3Csip:sip.example.com%3E")),
    "sdp01": Expect("3.3.15", (406,), "Accept excludes application/sdp, the only type Baton "
                    "can answer an INVITE with (RFC 3261 21.4.7)"),
    # 3.4: backward compatibility.
    "inv2543": Expect("3.4.1", (404,), "RFC 2543 INVITE (no branch, no Max-Forwards) to "
                      "'UserB', which is not a configured number"),
}

# Files whose expectation Baton does not meet yet: name -> what goes wrong.
# Strict, so the entry must go once the engine is fixed.
KNOWN_FAILURES: dict = {}


def transaction_key(data: bytes):
    """RFC 3261 17.2.3: top Via branch + sent-by host + method (ACK as INVITE)."""
    m = Msg.from_bytes(data)
    if m.method is None or not m.values("via"):
        return None
    branch = via_params(m.values("via")[0]).get("branch", "")
    if not branch.startswith("z9hG4bK") or len(branch) <= 7:
        return None
    method = "INVITE" if m.method == "ACK" else m.method
    return branch, via_host(m.values("via")[0]), method


def rounds(files: dict) -> list:
    """Groups of files sent to one engine each.

    Several RFC 4475 messages share branch, sent-by and method (cparam01 and
    cparam02, regescrt and escnull, unkscm and novelsc): within Timer J of
    one engine the second is, by RFC 3261 17.2.3, a retransmission of the
    first and rightly gets the first one's answer again. The later file of
    such a pair goes to the next engine instead."""
    out: list = []
    for name in sorted(files):
        with open(files[name], "rb") as f:
            key = transaction_key(f.read())
        for group in out:
            if key is None or key not in group["keys"]:
                break
        else:
            group = {"keys": set(), "names": []}
            out.append(group)
        group["names"].append(name)
        if key is not None:
            group["keys"].add(key)
    return [g["names"] for g in out]


ROUNDS = rounds(FILES)


# -- running it ---------------------------------------------------------------
@dataclasses.dataclass
class Round:
    names: list
    output: dict | None = None
    peer_error: str = ""
    alive_after: bool = False
    options_after: bool = False
    returncode: int | None = None
    stop_error: str = ""
    log: str = ""


def wait_ready(ns: Netns, eng: EngineProcess, timeout: float = 15.0) -> None:
    """Readiness as seen from inside the namespace: an OPTIONS is answered."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if eng.proc.poll() is not None:
            raise RuntimeError(f"engine exited early:\n{eng.output()}")
        if options_answered(ns, 2.0):
            return
    raise RuntimeError(f"engine did not answer OPTIONS:\n{eng.output()}")


def options_answered(ns: Netns, timeout: float) -> bool:
    r = ns.run([sys.executable, PEER, "probe", ENGINE, str(timeout)],
               capture_output=True, text=True, timeout=timeout + 10)
    return r.returncode == 0


def run_round(ns: Netns, names: list, engines: list) -> Round:
    rnd = Round(names)
    eng = EngineProcess(DEMO, port=5070, netns=ns.name, extra=["--log-level", "debug"])
    engines.append(eng)
    wait_ready(ns, eng)
    r = ns.run([sys.executable, PEER, "send", ENGINE, *(FILES[n] for n in names)],
               capture_output=True, text=True, timeout=45)
    if r.returncode == 0:
        rnd.output = json.loads(r.stdout)
    else:
        rnd.peer_error = f"peer exited {r.returncode}:\n{r.stderr}"
    rnd.alive_after = eng.proc.poll() is None
    if rnd.alive_after:
        rnd.options_after = options_answered(ns, 3.0)
    try:
        rnd.returncode = eng.stop(timeout=10)
    except AssertionError as exc:
        rnd.stop_error = str(exc)
    rnd.log = eng.output()
    return rnd


@pytest.fixture(scope="module")
def wire():
    if not FILES:
        pytest.fail(f"no torture files under {DATA}")
    ns = Netns("baton-rfc4475")
    try:
        ns.create()
    except NetnsUnavailable as exc:
        pytest.skip(f"needs a loopback-only network namespace: {exc}")
    engines: list = []
    try:
        yield [run_round(ns, names, engines) for names in ROUNDS]
    finally:
        for eng in engines:
            if eng.proc.poll() is None:
                eng.proc.kill()
                eng.proc.wait()
            eng.log.close()
            with contextlib.suppress(OSError):
                os.unlink(eng.log.name)
            shutil.rmtree(eng.data_dir, ignore_errors=True)
        ns.destroy()


def round_of(wire: list, name: str) -> Round:
    return next(r for r in wire if name in r.names)


def describe(got: list) -> str:
    return "; ".join(f"[:{m['port']}] {m['start']!r} "
                     f"Call-ID={Msg(m['start'], m['headers']).first('call-id')!r}"
                     for m in got) or "nothing"


# -- the tests ------------------------------------------------------------------
def test_every_file_has_an_expectation():
    assert FILES, f"no torture files under {DATA}"
    assert sorted(FILES) == sorted(EXPECT), (
        f"files without expectation: {sorted(set(FILES) - set(EXPECT))}; "
        f"expectations without file: {sorted(set(EXPECT) - set(FILES))}")


def test_namespace_is_loopback_only(wire):
    for rnd in wire:
        assert rnd.output is not None, rnd.peer_error
        iso = rnd.output["isolation"]
        assert iso["interfaces"] == ["lo"], iso
        # A send anywhere but loopback cannot leave: no route exists.
        assert "Network is unreachable" in iso["documentation"], iso
        assert "Network is unreachable" in iso["broadcast"], iso
        assert rnd.output["sniffer"], "no packet socket on lo: engine traffic is not watched"


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.xfail(reason=KNOWN_FAILURES[n], strict=True))
    if n in KNOWN_FAILURES else n for n in sorted(EXPECT)])
def test_torture_message(wire, name):
    exp = EXPECT[name]
    rnd = round_of(wire, name)
    assert rnd.output is not None, rnd.peer_error
    with open(FILES[name], "rb") as f:
        req = Msg.from_bytes(f.read())
    got = rnd.output["files"][name]["received"]
    where = f"{name} (RFC 4475 {exp.section}: {exp.why})"

    if not exp.statuses:
        assert not got, f"{where}: expected no answer, got {describe(got)}"
        return
    msgs = [Msg(m["start"], m["headers"]) for m in got]
    finals = [m for m in msgs if m.status is not None and m.status >= 200]
    assert len(finals) == 1, f"{where}: expected one final answer, got {describe(got)}"
    for m, raw in zip(msgs, got):
        # Nothing but 1xx may precede the final answer (100 Trying to an INVITE).
        assert m.status is not None and m.status >= 100, f"{where}: got {raw['start']!r}"
        # RFC 3261 18.2.2: source IP of the request, port of the top Via.
        assert raw["port"] == exp.port, f"{where}: answer arrived at :{raw['port']}"
        assert raw["src"] == ENGINE_SRC, f"{where}: answer came from {raw['src']}"
        # RFC 3261 8.2.6.2: Call-ID and CSeq copied from the request (multi01
        # has two of each; either is a copy).
        if req.values("call-id"):
            assert lws(m.first("call-id") or "") in [lws(v) for v in req.values("call-id")], \
                f"{where}: Call-ID {m.first('call-id')!r}, request had {req.values('call-id')}"
        if req.values("cseq"):
            assert cseq_of(m.first("cseq") or "") in [cseq_of(v) for v in req.values("cseq")], \
                f"{where}: CSeq {m.first('cseq')!r}, request had {req.values('cseq')}"
        # The client matches the answer by the top Via branch (RFC 3261 17.1.3).
        branch = via_params(req.values("via")[0]).get("branch") if req.values("via") else None
        if branch:
            assert via_params(m.first("via") or "").get("branch") == branch, \
                f"{where}: top Via {m.first('via')!r}"
    final = finals[0]
    assert final.status in exp.statuses, \
        f"{where}: expected {' or '.join(map(str, exp.statuses))}, got {final.start!r}"
    # RFC 3261 8.2.6.2: a final answer adds a To tag when the request had none --
    # except to a To that does not parse (quotbal's open quote would swallow the tag):
    # that one is echoed exactly as it came.
    to = req.values("to")
    if len(to) == 1 and to[0].count('"') % 2 == 1:
        assert final.first("to") == to[0], f"{where}: broken To not echoed as is"
    elif len(to) == 1 and not has_tag(to[0]):
        assert has_tag(final.first("to") or ""), f"{where}: To without tag: {final.first('to')!r}"
    if exp.check:
        exp.check(final, req)


@pytest.mark.parametrize("index", range(len(ROUNDS)),
                         ids=[f"round{i + 1}" for i in range(len(ROUNDS))])
def test_engine_survives(wire, index):
    rnd = wire[index]
    assert rnd.output is not None, rnd.peer_error
    assert rnd.alive_after, f"engine died during {rnd.names}:\n{rnd.log}"
    assert rnd.options_after, f"engine no longer answers OPTIONS:\n{rnd.log}"
    assert not rnd.stop_error, rnd.stop_error
    assert rnd.returncode == 0, f"exit code {rnd.returncode} after SIGTERM:\n{rnd.log}"
    assert "Traceback" not in rnd.log and " ERROR " not in rnd.log, rnd.log


@pytest.mark.parametrize("index", range(len(ROUNDS)),
                         ids=[f"round{i + 1}" for i in range(len(ROUNDS))])
def test_nothing_sent_elsewhere(wire, index):
    """Answers go only to the source address; no transaction keeps retransmitting."""
    rnd = wire[index]
    assert rnd.output is not None, rnd.peer_error
    out = rnd.output
    # Timer G would repeat a non-2xx INVITE answer whose ACK was not matched:
    # nothing may arrive once every message has been answered and acknowledged.
    assert not out["after"], f"late messages: {describe(out['after'])}"
    received = sum(len(f["received"]) for f in out["files"].values())
    # Every datagram the engine sent, as seen on lo, is one the peer received;
    # no TCP connection was attempted (all requests came over UDP).
    udp = [p for p in out["packets"] if p["proto"] == "udp"]
    assert not [p for p in out["packets"] if p["proto"] == "tcp"], out["packets"]
    assert all(p["dst"] in (["127.0.0.1", 5060], ["127.0.0.1", 5050]) for p in udp), udp
    assert len(udp) == received, f"{len(udp)} datagrams sent, {received} received"
    # A send off loopback fails in the namespace; the engine logs such errors.
    assert "unreachable" not in rnd.log.lower(), rnd.log
