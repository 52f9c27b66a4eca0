"""`baton demo`: a guided tour of Baton that runs by itself.

It starts an engine (with its accountant) on free loopback ports and a fresh
data directory, attaches the example vendor processes (examples/vendors/*.py)
over gRPC, and places calls with the `baton call` caller into the `tour` app
of examples/demo.toml:

    menu (baton.menu) -> account (acme.lookup, a vendor over gRPC)
        -> desk (baton.bridge to the echo number, a few seconds)
        -> survey (baton.survey, the post-call survey) -> goodbye

The caller presses the keys each module waits for, watching the session
journal to know which module holds the call. Then everything is stopped (the
accountant drains the ring into the ledger as it stops) and the tour prints
each session's module history, the account's consolidated invoice and the
vendors' payouts, as `baton sessions history`, `baton bill invoice` and
`baton bill payouts` would.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import tomllib

from engine.sessions import journal as store
from engine.accounting.config import PeriodClock
from engine.common import clock
from engine.cli.call import CallerError, CallRun, Phone, free_port
from engine.cli.common import print_session_history

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEMO_CONFIG = os.path.join(ROOT, "examples", "demo.toml")
VENDOR_DIR = os.path.join(ROOT, "examples", "vendors")
TOUR_NUMBER = "4000"


class DemoError(Exception):
    """The tour cannot go on; the message says what to fix."""


@dataclasses.dataclass
class Stage:
    """What the caller does while the session is at one node of the app:
    after `lead` seconds there, press `keys` `gap` seconds apart, then press
    `again` every `repeat` seconds while the session stays (a key pressed
    before the module listens is lost, so it is pressed again)."""
    keys: tuple = ()
    lead: float = 1.5
    gap: float = 2.0
    again: str | None = None
    repeat: float = 3.0
    note: str = ""


@dataclasses.dataclass
class TourCall:
    caller: str          # the user part of the From (the lookup vendor knows alice and bob)
    story: str
    stages: dict         # node name -> Stage


CALLS = [
    TourCall("alice", "alice presses 1 at the menu, then 2 for an agent: bridged to the echo "
                      "desk, then the post-call survey",
             {"menu": Stage(("1",), lead=1.0, again="1"),
              "account": Stage(("2",), again="2", note="the vendor's own menu: 2 = an agent"),
              "desk": Stage(note="bridged to the echo desk (1001) until the time limit"),
              "survey": Stage(("5", "1"), again="1", note="satisfaction 5, recommend: yes"),
              "goodbye": Stage()}),
    TourCall("bob", "bob presses 1 at the menu, then 1 to hear his balance, then the survey",
             {"menu": Stage(("1",), lead=1.0, again="1"),
              "account": Stage(("1",), note="the vendor's own menu: 1 = the balance"),
              "survey": Stage(("4", "2"), again="2", note="satisfaction 4, recommend: no"),
              "goodbye": Stage()}),
]


class Tour:
    def __init__(self, args):
        self.args = args
        self.t0 = time.monotonic()
        self.config = os.path.abspath(args.config)
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.engine: subprocess.Popen | None = None
        self.data_dir = ""
        self.sip_port = self.grpc_port = self.http_port = 0
        self.session_ids: list[str] = []
        self.vendor_logs: dict[str, str] = {}

    # -- output ------------------------------------------------------------------------
    def say(self, line: str) -> None:
        print(f"[{time.monotonic() - self.t0:5.1f}s] {line}", flush=True)

    @staticmethod
    def heading(title: str) -> None:
        print(f"\n== {title} ==", flush=True)

    # -- set-up ------------------------------------------------------------------------
    def check(self) -> dict:
        from engine.cli import call as caller

        if caller.pj is None:
            raise DemoError("PJSIP's Python binding is missing: .venv/bin/pip install "
                            "pjsua2-python (make setup does)")
        if shutil.which("espeak-ng") is None:
            raise DemoError("espeak-ng is not installed (the menus speak with it): "
                            "apt-get install espeak-ng (make setup does)")
        try:
            with open(self.config, "rb") as f:
                raw = tomllib.load(f)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise DemoError(f"cannot read the config {self.config}: {exc}") from None
        for account, a in raw.get("accounts", {}).items():
            if TOUR_NUMBER in a.get("numbers", {}):
                self.account = account
                break
        else:
            raise DemoError(f"{self.config} has no number {TOUR_NUMBER} (the tour app)")
        return raw

    def start_engine(self) -> None:
        if self.args.data_dir:
            self.data_dir = os.path.abspath(self.args.data_dir)
            os.makedirs(self.data_dir, exist_ok=True)
        else:
            self.data_dir = tempfile.mkdtemp(prefix="baton-demo-")
        self.sip_port = free_port()
        self.grpc_port = free_port()
        self.http_port = free_port()
        log = os.path.join(self.data_dir, "engine.log")
        cmd = [sys.executable, "-m", "engine.cli", "serve", "--config", self.config,
               "--sip-addr", f"127.0.0.1:{self.sip_port}",
               "--grpc-addr", f"127.0.0.1:{self.grpc_port}", "--data-dir", self.data_dir,
               "--http-addr", f"127.0.0.1:{self.http_port}"]
        self.say(f"starting the engine and its accountant (data {self.data_dir})")
        with open(log, "ab") as out:
            self.engine = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                           stdin=subprocess.DEVNULL, env=_child_env())
        self._wait_for(log, "serving SIP on", self.engine, "the engine", 30)
        self.say(f"engine up: SIP 127.0.0.1:{self.sip_port}, gRPC 127.0.0.1:{self.grpc_port} "
                 f"(log {log})")

    def start_vendors(self, raw: dict) -> None:
        """One process per vendor module code the tour app uses."""
        modules = raw.get("modules", {})
        nodes = raw.get("apps", {}).get("tour", {}).get("nodes", {})
        codes = sorted({n.get("module") for n in nodes.values()
                        if modules.get(n.get("module"), {}).get("vendor")})
        for code in codes:
            vendor = modules[code]["vendor"]
            secret = raw.get("vendors", {}).get(vendor, {}).get("secret", "")
            script = os.path.join(VENDOR_DIR, code.split(".", 1)[1] + ".py")
            if not os.path.exists(script):
                raise DemoError(f"the tour uses {code}, but there is no {script}")
            log = os.path.join(self.data_dir, f"vendor-{code}.log")
            self.vendor_logs[code] = log
            with open(log, "ab") as out:
                proc = subprocess.Popen(
                    [sys.executable, script, "--engine", f"127.0.0.1:{self.grpc_port}",
                     "--code", code, "--secret", secret, "--timeout", "6"],
                    cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    env=_child_env())
            self.procs.append((code, proc))
            # The SDK logs "registered CODE as PROCESS" once the engine has accepted it.
            self._wait_for(log, f"registered {code}", proc, f"vendor {code}", 30)
            self.say(f"vendor {vendor} attached {code} over gRPC "
                     f"({os.path.relpath(script, ROOT)}, pid {proc.pid})")

    def _wait_for(self, path: str, text: str, proc: subprocess.Popen, what: str,
                  timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in _read(path):
                return
            if proc.poll() is not None:
                raise DemoError(f"{what} exited with {proc.returncode}:\n{_tail(path)}")
            time.sleep(0.05)
        raise DemoError(f"{what} did not start within {timeout:g} s:\n{_tail(path)}")

    # -- the calls ---------------------------------------------------------------------
    def place_calls(self) -> None:
        uri = f"sip:{TOUR_NUMBER}@127.0.0.1:{self.sip_port}"
        calls = CALLS[:self.args.calls]
        with Phone(from_user="baton-demo") as phone:
            for i, tc in enumerate(calls, 1):
                self.heading(f"call {i} of {len(calls)}: {tc.story}")
                self.one_call(phone, uri, tc)

    def one_call(self, phone: Phone, uri: str, tc: TourCall) -> None:
        who = tc.caller
        run = CallRun(phone, uri, report=lambda line: self.say(f"{who}: {line}"),
                      ring_timeout=15, from_user=who)
        started_wall = clock.wall_ns()
        run.start()
        session_id = None
        seen = 0               # history spans already reported
        node, entered, pressed, last_press = None, 0.0, 0, 0.0
        last_look = 0.0
        deadline = time.monotonic() + self.args.max_call_seconds
        try:
            while run.poll():
                now = time.monotonic()
                if now > deadline:
                    self.say(f"{who}: the call took longer than {self.args.max_call_seconds:g} s:"
                             " hanging up")
                    run.hangup("too long")
                    continue
                if not run.call.confirmed or now - last_look < 0.1:
                    continue
                last_look = now
                row = self._session(session_id, who, started_wall)
                if row is None:
                    continue
                if session_id is None:
                    session_id = row["id"]
                    self.session_ids.append(session_id)
                    self.say(f"{who}: the engine's session is {session_id}")
                for span in row["history"][seen:]:
                    stage = tc.stages.get(span["node"]) or Stage()
                    note = f" — {stage.note}" if stage.note else ""
                    self.say(f"{who}: control passes to {span['module']} (node {span['node']}, "
                             f"{span['level']} level; {span['reason']}){note}")
                seen = len(row["history"])
                if not row["history"] or not row["live"]:
                    continue
                # A node entered again (a menu repeating itself) is a new visit.
                current = (len(row["history"]), row["history"][-1]["node"])
                if current != node:
                    node, entered, pressed, last_press = current, now, 0, 0.0
                stage = tc.stages.get(node[1]) or Stage()
                if pressed < len(stage.keys):
                    due = entered + stage.lead + pressed * stage.gap
                    if now >= due:
                        run.send_dtmf(stage.keys[pressed])
                        pressed += 1
                        last_press = now
                elif stage.again and last_press and now - last_press >= stage.repeat:
                    self.say(f"{who}: still at {node[1]}: pressing {stage.again} again")
                    run.send_dtmf(stage.again)
                    last_press = now
        except KeyboardInterrupt:
            run.hangup("interrupted")
            run.finish()
            raise
        result = run.finish()
        if not result.answered:
            raise DemoError(f"the tour number did not answer: {result.status} {result.reason}")

    def _session(self, session_id: str | None, who: str, since_ns: int) -> dict | None:
        """The tour session of this call in the journal (None until it is there)."""
        try:
            if session_id is not None:
                return store.get_session(self.data_dir, session_id)
            for row in store.list_sessions(self.data_dir, limit=20):
                if row["number"] == TOUR_NUMBER and row["started_wall_ns"] >= since_ns - 10**9 \
                        and f"sip:{who}@" in (row["from_uri"] or "") \
                        and row["id"] not in self.session_ids:
                    return row
        except (OSError, sqlite3.Error):   # not written yet, or busy: look again
            return None
        return None

    def rest_look(self, raw: dict) -> None:
        """The tour's calls as the REST API answers them (what the `twilio` client reads)."""
        import base64
        import json
        import urllib.error
        import urllib.request

        acc = raw.get("accounts", {}).get(self.account, {})
        sid, token = acc.get("sid") or self.account, acc.get("auth_token")
        if not token or not self.session_ids:
            return
        self.heading("the same calls through the REST API (Twilio-compatible, docs/rest.md)")
        auth = base64.b64encode(f"{sid}:{token}".encode()).decode()
        for session_id in self.session_ids:
            path = f"/2010-04-01/Accounts/{sid}/Calls/{session_id}"
            try:
                calls = {}
                for what in (".json", "/History.json"):
                    req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}{what}",
                                                 headers={"Authorization": "Basic " + auth})
                    with urllib.request.urlopen(req, timeout=10) as r:
                        calls[what] = json.loads(r.read())
            except (OSError, ValueError, urllib.error.HTTPError) as exc:
                self.say(f"GET {path}.json: {exc}")
                continue
            c, h = calls[".json"], calls["/History.json"]
            self.say(f"GET {path}.json: status {c['status']}, from {c['from']} to {c['to']}, "
                     f"duration {c['duration']} s; History.json: "
                     f"{' -> '.join(span['module'] for span in h['history'])}")

    # -- the end -----------------------------------------------------------------------
    def settle(self, timeout: float = 10.0) -> None:
        """Until the journal has every session ended (the writer batches)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if not store.list_sessions(self.data_dir, live=True):
                    return
            except (OSError, sqlite3.Error):
                pass
            time.sleep(0.2)

    def stop(self) -> None:
        """Vendors first, then the engine, whose accountant drains the ring and stops."""
        for code, proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for code, proc in self.procs:
            _wait(proc, 10)
        self.procs.clear()
        if self.engine is not None and self.engine.poll() is None:
            self.engine.send_signal(signal.SIGTERM)
            code = _wait(self.engine, 30)
            self.say(f"engine stopped (exit {code}); the accountant wrote the ledger as it "
                     "stopped")
        self.engine = None

    def report(self) -> None:
        from engine.accounting.accountant import bill_main

        self.heading("what the modules collected")
        for run in reversed(_survey_runs(self.data_dir, self.account)):
            answers = " ".join(f"{a['question']}={a['answer']}" for a in run["answers"])
            print(f"{run['survey']} survey, session {run['session_id']}: {run['status']}: "
                  f"{answers or '(no answers)'}")
        for code, log in self.vendor_logs.items():
            lines = [ln for ln in _read(log).splitlines()
                     if ln and not ln[:4].isdigit()]   # their results, not their log lines
            for ln in lines:
                print(f"{code} (vendor process) printed: {ln}")
        self.heading("each session's module history (baton sessions history)")
        rows = store.list_sessions(self.data_dir, limit=100)
        for row in sorted(rows, key=lambda r: r["started_wall_ns"]):
            print_session_history(row)
            print()
        # The tour's calls, on billing's clock (engine/common/clock.py).
        period = PeriodClock().of(clock.wall_ns())
        common = ["--period", period, "--data-dir", self.data_dir, "--config", self.config]
        self.heading(f"the consolidated invoice (baton bill invoice --account {self.account})")
        sys.stdout.flush()
        if bill_main(["invoice", "--account", self.account, *common]) != 0:
            raise DemoError("no invoice: see the accountant's log "
                            f"{os.path.join(self.data_dir, 'accountant.log')}")
        self.heading("the vendor payouts (baton bill payouts)")
        sys.stdout.flush()
        if bill_main(["payouts", *common]) != 0:
            raise DemoError("no payouts: see the accountant's log "
                            f"{os.path.join(self.data_dir, 'accountant.log')}")
        sys.stdout.flush()
        rel = os.path.relpath(self.config)
        rel = self.config if rel.startswith("..") else rel
        print(f"\nThe tour's data stays in {self.data_dir}; look again with:\n"
              f"  baton sessions list --data-dir {self.data_dir}\n"
              f"  baton bill invoice --account {self.account} --period {period} "
              f"--data-dir {self.data_dir} --config {rel}\n"
              f"  baton bill payouts --period {period} --data-dir {self.data_dir} "
              f"--config {rel}", flush=True)


def _survey_runs(data_dir: str, account: str) -> list[dict]:
    """The built-in survey's results (baton.survey keeps them in its own SQLite file)."""
    path = os.path.join(data_dir, "services", "survey.db")
    if not os.path.exists(path):
        return []
    try:
        from engine.modules.services.survey import SurveyStore

        db = SurveyStore(path)
        try:
            return db.results(account)
        finally:
            db.close()
    except sqlite3.Error:   # an older or newer store: the history still shows the survey
        return []


def _child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    # The engine forks espeak-ng while gRPC threads run; gRPC's fork handlers are not needed.
    env.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
    return env


def _read(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def _tail(path: str, n: int = 3000) -> str:
    return _read(path)[-n:] or "(empty log)"


def _wait(proc: subprocess.Popen, timeout: float) -> int:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="baton demo",
        description="A guided tour that runs by itself: starts an engine and its accountant "
                    "on free loopback ports with a fresh data directory, attaches the example "
                    "vendor processes over gRPC, places calls through the multi-module `tour` "
                    f"app (number {TOUR_NUMBER}: menu -> vendor module -> bridge -> post-call "
                    "survey), then prints each session's module history, the consolidated "
                    "invoice and the vendor payouts, and stops everything. Takes about 40 "
                    "seconds.")
    p.add_argument("--config", default=DEMO_CONFIG, metavar="PATH",
                   help="the config with the tour app (default: examples/demo.toml of this "
                        "checkout)")
    p.add_argument("--data-dir", metavar="DIR",
                   help="keep the engine's data here (default: a new temporary directory)")
    p.add_argument("--calls", type=int, choices=range(1, len(CALLS) + 1), default=len(CALLS),
                   help=f"how many tour calls to place (default {len(CALLS)})")
    p.add_argument("--max-call-seconds", type=float, default=60.0, metavar="SECONDS",
                   help="hang up a tour call that takes longer than this (default 60)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    tour = Tour(args)
    code = 0
    # SIGTERM ends the tour like Ctrl-C: calls hung up, children stopped.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        raw = tour.check()
        print(f"baton demo: a tour of {TOUR_NUMBER} (menu -> {_chain(raw)}) "
              f"with {args.calls} call(s)", flush=True)
        tour.start_engine()
        tour.start_vendors(raw)
        tour.place_calls()
        tour.settle()
        tour.rest_look(raw)
        tour.heading("stopping")
        tour.stop()
        tour.report()
    except DemoError as exc:
        print(f"baton demo: {exc}", file=sys.stderr, flush=True)
        code = 1
    except CallerError as exc:
        print(f"baton demo: the caller failed: {exc}", file=sys.stderr, flush=True)
        code = 1
    except KeyboardInterrupt:
        print("baton demo: interrupted", file=sys.stderr, flush=True)
        code = 130
    finally:
        tour.stop()
    return code


def _chain(raw: dict) -> str:
    """The tour app's nodes after the menu, by module, for the first line."""
    nodes = raw.get("apps", {}).get("tour", {}).get("nodes", {})
    order = [n for n in ("account", "desk", "survey") if n in nodes]
    return " -> ".join(nodes[n].get("module", "?") for n in order) or "?"


if __name__ == "__main__":
    sys.exit(main())
