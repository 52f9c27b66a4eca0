"""Helpers shared by the benchmarks in bench/.

Finding tools, building the C baselines, CPU accounting of process trees from /proc,
driving SIPp, the Kamailio stateless responder, the generator -> relay -> sink run,
free ports, reading metrics pages, common arguments, the result files and JSON line a
driver ends with (report()) and a progress bar.  Every child process is started through
spawn() so that it is stopped again on exit, on Ctrl-C and on SIGTERM.
"""

from __future__ import annotations

import atexit
import datetime as _dt
import json
import os
import platform
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
BASELINE_DIR = BENCH_DIR / "baseline"
RESULTS_DIR = BENCH_DIR / "results"
LOOPBACK = "127.0.0.1"

# Daemons live in sbin, which is not on every user's PATH.
_EXTRA_BIN_DIRS = ("/usr/sbin", "/sbin", "/usr/local/sbin", "/usr/local/bin")
_DEBIAN_PACKAGE = {"sipp": "sip-tester", "kamailio": "kamailio", "cc": "gcc"}
CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchError(RuntimeError):
    """A benchmark cannot go on; the message says why."""


# --------------------------------------------------------------------------- binaries


def find_binary(name: str) -> str:
    """Absolute path of an executable, looked for on PATH and in the sbin directories."""
    path = os.environ.get("PATH", "") + os.pathsep + os.pathsep.join(_EXTRA_BIN_DIRS)
    found = shutil.which(name, path=path)
    if found is None:
        package = _DEBIAN_PACKAGE.get(name, name)
        raise BenchError(f"{name} not found (Debian package: {package})")
    return found


def tool_version(argv: Sequence[str]) -> str:
    """First non-empty line a tool prints about its version, or '' if it cannot be run."""
    try:
        out = subprocess.run(list(argv), capture_output=True, text=True, timeout=10,
                             stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        return ""
    for line in (out.stdout + out.stderr).splitlines():
        if line.strip():
            return line.strip()
    return ""


def baseline_bin_dir() -> Path:
    """Where the compiled C baselines are cached: $BATON_BASELINE_BIN or bench/results/.bin."""
    env = os.environ.get("BATON_BASELINE_BIN")
    return Path(env) if env else RESULTS_DIR / ".bin"


_CFLAGS = ("-O2", "-Wall", "-Wextra")


def build_baseline(name: str) -> Path:
    """Compile bench/baseline/NAME.c into the cache dir unless the binary is up to date."""
    src = BASELINE_DIR / f"{name}.c"
    if not src.is_file():
        raise BenchError(f"missing baseline source {src}")
    out_dir = baseline_bin_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / name
    stamp = out_dir / f"{name}.flags"
    flags = " ".join(_CFLAGS)
    fresh = (out.is_file() and out.stat().st_mtime >= src.stat().st_mtime
             and stamp.is_file() and stamp.read_text() == flags)
    if fresh:
        return out
    compiler = os.environ.get("CC") or find_binary("cc")
    # Build under a private name and rename, so a concurrent run never executes half a file.
    tmp = out_dir / f".{name}.{os.getpid()}.tmp"
    try:
        proc = subprocess.run([compiler, *_CFLAGS, "-o", str(tmp), str(src)],
                              capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise BenchError(f"compiling {src.name} failed:\n{proc.stderr.strip()}")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    stamp.write_text(flags)
    return out


# --------------------------------------------------------------------------- processes

_children: dict[int, subprocess.Popen[bytes]] = {}


def spawn(argv: Sequence[str | os.PathLike[str]], *, log: Path | None = None,
          cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start a child in its own session, stdout+stderr to LOG, and remember it for cleanup.

    Its own session keeps a terminal's Ctrl-C from reaching it directly: cleanup stops it
    in order instead, and never leaves it behind.
    """
    out = open(log, "wb") if log is not None else subprocess.DEVNULL
    try:
        proc = subprocess.Popen([str(a) for a in argv], stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, cwd=cwd, env=env,
                                start_new_session=True)
    finally:
        if log is not None:
            out.close()  # type: ignore[union-attr]
    _children[proc.pid] = proc
    return proc


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat from field 3 (state) on, or None if the process is gone."""
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may contain spaces and parentheses: split after the last ')'.
    return data[data.rindex(")") + 2:].split()


def _start_time(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else None


def process_tree(roots: Iterable[int]) -> list[int]:
    """The given pids that still exist plus all their descendants, from one scan of /proc."""
    children: dict[int, list[int]] = {}
    alive: set[int] = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat_fields(int(entry))
        if fields is None:
            continue
        pid = int(entry)
        alive.add(pid)
        children.setdefault(int(fields[1]), []).append(pid)
    seen: list[int] = []
    stack = [p for p in dict.fromkeys(roots) if p in alive]
    while stack:
        pid = stack.pop()
        if pid in seen:
            continue
        seen.append(pid)
        stack.extend(children.get(pid, ()))
    return seen


def tree_cpu_seconds(roots: Iterable[int]) -> float:
    """CPU time (user + system) of a process tree so far, in seconds.

    Children that already exited and were reaped are counted through their parent's
    cutime/cstime, so the figure does not fall when a worker process ends.
    """
    ticks = 0
    for pid in process_tree(roots):
        fields = _stat_fields(pid)
        if fields is not None:
            # utime, stime, cutime, cstime are stat fields 14..17.
            ticks += sum(int(v) for v in fields[11:15])
    return ticks / CLK_TCK


class CpuMeter:
    """CPU seconds a set of process trees spends between start() and stop()."""

    def __init__(self, pids: Callable[[], Iterable[int]] | Iterable[int]) -> None:
        self._pids = pids if callable(pids) else (lambda fixed=list(pids): fixed)
        self._t0 = 0.0

    def start(self) -> CpuMeter:
        self._t0 = tree_cpu_seconds(self._pids())
        return self

    def stop(self) -> float:
        return max(0.0, tree_cpu_seconds(self._pids()) - self._t0)


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 10.0,
                 sig: int = signal.SIGTERM) -> int | None:
    """Stop a spawned child and whatever it started: SIG first, SIGKILL after TIMEOUT."""
    if proc.poll() is None:
        tree = [(p, _start_time(p)) for p in process_tree([proc.pid])]
        try:
            proc.send_signal(sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_listed(tree)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        # A descendant that outlived its parent is killed only if its pid still names
        # the same process (same start time), never a stranger that reused the pid.
        _kill_listed([(p, t) for p, t in tree if p != proc.pid])
    _children.pop(proc.pid, None)
    return proc.returncode


def _kill_listed(tree: Sequence[tuple[int, int | None]]) -> None:
    for pid, started in tree:
        if started is not None and _start_time(pid) == started:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def cleanup_children() -> None:
    """Stop every child still running; registered with atexit."""
    for proc in list(_children.values()):
        stop_process(proc, timeout=3.0)


def _raise_interrupt(_signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt


def install_cleanup() -> None:
    """Make SIGTERM and SIGHUP act like Ctrl-C.

    A benchmark stopped from outside then takes the same path as an interrupted one:
    servers stopped, partial results still reported.
    """
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGHUP, _raise_interrupt)


atexit.register(cleanup_children)


def wait_for(proc: subprocess.Popen[bytes], timeout: float,
             tick: Callable[[float], None] | None = None) -> tuple[int | None, float]:
    """Wait for a child at most TIMEOUT seconds, calling TICK(elapsed) about 5 times a second.

    Returns (returncode, elapsed); returncode is None if it was still running and had to
    be stopped.
    """
    start = time.monotonic()
    while True:
        elapsed = time.monotonic() - start
        try:
            proc.wait(timeout=min(0.2, max(0.0, timeout - elapsed)))
            return proc.returncode, time.monotonic() - start
        except subprocess.TimeoutExpired:
            pass
        elapsed = time.monotonic() - start
        if tick is not None:
            tick(elapsed)
        if elapsed >= timeout:
            stop_process(proc, timeout=3.0)
            return None, elapsed


def last_json_line(path: Path) -> dict[str, Any] | None:
    """The last line of a file that parses as a JSON object (the C tools' report)."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        line = line.strip()
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except ValueError:
                continue
            if isinstance(value, dict):
                return value
    return None


def start_ready(argv: Sequence[str | os.PathLike[str]], log: Path, address: tuple[str, int],
                ready_timeout: float, name: str = "baton") -> subprocess.Popen[bytes]:
    """Spawn a SIP server and wait until it answers OPTIONS at ADDRESS; if it does not,
    stop it and raise BenchError with the end of its log."""
    proc = spawn(argv, log=log, cwd=REPO_DIR)
    try:
        wait_sip_ready(*address, timeout=ready_timeout, proc=proc)
    except BenchError as exc:
        tail = log_tail(log)
        stop_process(proc)
        raise BenchError(f"{name} did not start: {exc}\n{tail}") from None
    return proc


def add_baton_args(p: Any) -> None:
    """--baton and --ready-timeout, for a benchmark that starts `baton serve`."""
    p.add_argument("--baton", type=Path, default=REPO_DIR / ".venv" / "bin" / "baton",
                   help="baton executable (default: .venv/bin/baton)")
    p.add_argument("--ready-timeout", type=float, default=30.0,
                   help="seconds the engine gets to answer OPTIONS (default: %(default)s)")


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# --------------------------------------------------------------------------- network

_handed_out: set[int] = set()


def free_port(host: str = LOOPBACK, tcp_too: bool = True) -> int:
    """A port free for UDP (and TCP, unless told otherwise) on HOST, never the same twice."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind((host, 0))
            port = udp.getsockname()[1]
            if port in _handed_out:
                continue
            if tcp_too:
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                    try:
                        tcp.bind((host, port))
                    except OSError:
                        continue
        _handed_out.add(port)
        return port
    raise BenchError("no free port found")


def parse_hostport(text: str, default_port: int = 5060) -> tuple[str, int]:
    """'HOST:PORT' (or '[v6]:PORT', or a bare host) -> (host, port)."""
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else default_port
    if text.count(":") == 1:
        host, port = text.split(":")
        return host, int(port)
    return text, default_port


def udp_port_bound(port: int) -> bool:
    """Whether some socket on this machine (this network namespace) is bound to UDP PORT."""
    want = f":{port:04X}"
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            if len(cols) > 1 and cols[1].endswith(want):
                return True
    return False


def wait_udp_bound(port: int, timeout: float = 10.0,
                   proc: subprocess.Popen[bytes] | None = None) -> None:
    """Wait until something listens on UDP PORT; fail early if PROC exits meanwhile."""
    deadline = time.monotonic() + timeout
    while not udp_port_bound(port):
        if proc is not None and proc.poll() is not None:
            raise BenchError(f"process {proc.pid} exited ({proc.returncode}) "
                             f"before binding UDP port {port}")
        if time.monotonic() > deadline:
            raise BenchError(f"nothing bound UDP port {port} within {timeout:.0f} s")
        time.sleep(0.02)


def sip_options(host: str, port: int, local: tuple[str, int]) -> bytes:
    """A minimal out-of-dialog OPTIONS request from LOCAL to HOST:PORT."""
    lhost, lport = local
    tag = secrets.token_hex(6)
    return (
        f"OPTIONS sip:{host}:{port} SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP {lhost}:{lport};branch=z9hG4bK{tag};rport\r\n"
        f"Max-Forwards: 70\r\n"
        f"From: <sip:probe@{lhost}>;tag={tag}\r\n"
        f"To: <sip:{host}:{port}>\r\n"
        f"Call-ID: probe-{tag}@{lhost}\r\n"
        f"CSeq: 1 OPTIONS\r\n"
        f"Contact: <sip:probe@{lhost}:{lport}>\r\n"
        f"Accept: application/sdp\r\n"
        f"Content-Length: 0\r\n\r\n"
    ).encode()


def wait_sip_ready(host: str, port: int, timeout: float = 30.0,
                   proc: subprocess.Popen[bytes] | None = None) -> float:
    """Send OPTIONS to HOST:PORT until any SIP response comes back; returns seconds waited.

    Fails early if PROC (the server being started) exits.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    start = time.monotonic()
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.bind((host if host in (LOOPBACK, "::1") else "", 0))
        sock.settimeout(0.25)
        request = sip_options(host, port, sock.getsockname()[:2])
        while True:
            if proc is not None and proc.poll() is not None:
                raise BenchError(f"server exited ({proc.returncode}) before answering OPTIONS")
            try:
                sock.sendto(request, (host, port))
                data, _ = sock.recvfrom(65535)
                if data.startswith(b"SIP/2.0 "):
                    return time.monotonic() - start
            except (TimeoutError, ConnectionRefusedError):
                pass
            if time.monotonic() - start > timeout:
                raise BenchError(f"no answer to OPTIONS from {host}:{port} "
                                 f"within {timeout:.0f} s")


# --------------------------------------------------------------------------- SIPp


@dataclass
class SippResult:
    """One SIPp run: what was offered and what came back."""

    offered_rate: float
    calls: int
    successful: int
    failed: int
    wall_s: float
    returncode: int | None
    retransmissions: int = 0
    timed_out: bool = False
    error: str = ""
    hold_s: float = 0.0

    @property
    def cps(self) -> float:
        # Calls that stay up for HOLD_S end that much after the last one was placed.
        span = self.wall_s - self.hold_s
        return self.successful / span if span > 0 else 0.0


def _parse_sipp_stat(path: Path) -> dict[str, str]:
    """Last row of a SIPp -trace_stat CSV file as {column: value}."""
    try:
        rows = [r for r in path.read_text(errors="replace").splitlines() if r.strip()]
    except OSError:
        return {}
    if len(rows) < 2:
        return {}
    header = rows[0].rstrip(";").split(";")
    values = rows[-1].rstrip(";").split(";")
    return dict(zip(header, values))


def _parse_sipp_screen(path: Path) -> dict[str, int]:
    """Cumulative 'Successful call' / 'Failed call' counts from the last screen dump."""
    found: dict[str, int] = {}
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return found
    for line in text.splitlines():
        cols = [c.strip() for c in line.split("|")]
        if len(cols) >= 3 and cols[0] in ("Successful call", "Failed call"):
            try:
                found[cols[0]] = int(cols[2])
            except ValueError:
                pass
    return found


def run_sipp(target: tuple[str, int], rate: float, seconds: float, workdir: Path, *,
             service: str = "1000", call_limit: int | None = None,
             recv_timeout_ms: int = 5000, scenario: Path | None = None,
             hold_s: float = 0.0, extra_args: Sequence[str] = (),
             tick: Callable[[float], None] | None = None) -> SippResult:
    """Offer RATE calls/s for SECONDS with SIPp's built-in uac scenario (or SCENARIO).

    Each call is INVITE, 200, ACK, BYE, 200 with no pause (a SCENARIO whose calls last
    HOLD_S seconds says so, for the achieved rate).  A call with no answer within
    RECV_TIMEOUT_MS counts as failed, which bounds the run when the server stalls; CALL_LIMIT
    bounds the calls in flight (default: 3 s worth of calls).
    """
    host, port = target
    calls = max(1, round(rate * seconds))
    limit = call_limit or max(1000, int(rate * 3))
    workdir.mkdir(parents=True, exist_ok=True)
    screen, stat, log = workdir / "screen.txt", workdir / "stat.csv", workdir / "sipp.log"
    for f in (screen, stat):
        f.unlink(missing_ok=True)
    local_ip = host if host.startswith("127.") or host == "::1" else ""
    hard_limit = seconds * 3 + hold_s + recv_timeout_ms / 1000 + 30
    argv: list[str] = [find_binary("sipp")]
    argv += ["-sf", str(scenario)] if scenario else ["-sn", "uac"]
    argv += [f"{host}:{port}" if ":" not in host else f"[{host}]:{port}",
             "-s", service, "-r", f"{rate:g}", "-m", str(calls), "-d", "0",
             "-l", str(limit), "-p", str(free_port(local_ip or LOOPBACK, tcp_too=False)),
             "-recv_timeout", str(recv_timeout_ms), "-timeout", f"{int(hard_limit)}s",
             "-nostdin", "-trace_screen", "-screen_file", str(screen),
             "-trace_stat", "-stf", str(stat), "-fd", "1"]
    if local_ip:
        # Keep Via and Contact on loopback, so replies never leave for another address.
        argv += ["-i", local_ip]
    argv += list(extra_args)
    start = time.monotonic()
    proc = spawn(argv, log=log, cwd=workdir)
    rc, _ = wait_for(proc, hard_limit + 10, tick)
    _children.pop(proc.pid, None)
    wall = time.monotonic() - start
    stats = _parse_sipp_stat(stat)
    screen_counts = _parse_sipp_screen(screen)

    def count(column: str, screen_name: str) -> int:
        value = stats.get(column) or screen_counts.get(screen_name)
        try:
            return int(value) if value is not None else 0
        except ValueError:
            return 0

    result = SippResult(offered_rate=rate, calls=calls,
                        successful=count("SuccessfulCall(C)", "Successful call"),
                        failed=count("FailedCall(C)", "Failed call"),
                        wall_s=wall, returncode=rc,
                        retransmissions=count("Retransmissions(C)", ""),
                        timed_out=rc is None, hold_s=hold_s)
    # SIPp: 0 all calls succeeded, 1 some failed; anything else is an error of the run.
    if rc not in (0, 1):
        result.error = f"sipp exited with {rc}: {log_tail(log, 5)}"
    elif result.successful + result.failed == 0:
        result.error = f"sipp reported no calls: {log_tail(log, 5)}"
    return result


# --------------------------------------------------------------------------- Kamailio


class KamailioResponder:
    """Kamailio started from bench/baseline/kamailio-responder.cfg on a loopback port."""

    def __init__(self, port: int | None = None, workdir: Path | None = None) -> None:
        self.port = port or free_port()
        self.host = LOOPBACK
        self._own_dir = workdir is None
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="baton-kamailio-"))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    def start(self, ready_timeout: float = 20.0) -> None:
        template = (BASELINE_DIR / "kamailio-responder.cfg").read_text()
        cfg = self.workdir / "kamailio.cfg"
        cfg.write_text(template.replace("@PORT@", str(self.port)))
        log = self.workdir / "kamailio.log"
        # -DD: stay in the foreground (the master is our child) but fork the workers.
        self.proc = spawn([find_binary("kamailio"), "-f", cfg, "-P", self.workdir / "kamailio.pid",
                           "-w", self.workdir, "-DD", "-E"], log=log, cwd=self.workdir)
        try:
            wait_sip_ready(self.host, self.port, ready_timeout, self.proc)
        except BenchError as exc:
            self.stop()
            raise BenchError(f"kamailio did not start: {exc}\n{log_tail(log)}") from None

    def pids(self) -> list[int]:
        """The master and all its worker processes."""
        return process_tree([self.proc.pid]) if self.proc else []

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, timeout=10.0)
            self.proc = None
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> KamailioResponder:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------- UDP relay


class RelayUnderTest(Protocol):
    """A UDP relay put between the generator and the sink.

    start() gets the sink's address and returns the address the generator must send to;
    pids() names the processes whose CPU time is the relay's; stop() ends the relay and
    returns whatever it reports about itself (may be empty).
    """

    name: str

    def start(self, sink: tuple[str, int]) -> tuple[str, int]: ...

    def pids(self) -> list[int]: ...

    def stop(self) -> dict[str, Any]: ...


class CRelay:
    """bench/baseline/relay.c: recvmmsg/sendmmsg in batches of 64, one thread."""

    name = "c-recvmmsg-64"

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None
        self._log = workdir / "relay.out"

    def start(self, sink: tuple[str, int]) -> tuple[str, int]:
        in_port = free_port(tcp_too=False)
        self.proc = spawn([build_baseline("relay"), in_port, sink[1], 600], log=self._log)
        wait_udp_bound(in_port, 10.0, self.proc)
        return LOOPBACK, in_port

    def pids(self) -> list[int]:
        return [self.proc.pid] if self.proc else []

    def stop(self) -> dict[str, Any]:
        if self.proc is None:
            return {}
        # SIGTERM makes it print its report and exit.
        stop_process(self.proc, timeout=5.0)
        self.proc = None
        return last_json_line(self._log) or {}


def run_gen_sink(relay: RelayUnderTest, seconds: float, rate_pps: float = 0.0,
                 size: int = 172, idle_ms: int = 1000,
                 tick: Callable[[float], None] | None = None) -> dict[str, Any]:
    """Generator -> RELAY -> sink on loopback for SECONDS; counts at each stage, relay CPU.

    RATE_PPS 0 sends flat out.  The relay's CPU is sampled while it still runs, before
    stop(), so a relay that is a long-lived server is accounted the same way as the C one.
    """
    with tempfile.TemporaryDirectory(prefix="baton-relay-") as tmp:
        work = Path(tmp)
        gen_bin, sink_bin = build_baseline("gen"), build_baseline("sink")
        out_port = free_port(tcp_too=False)
        sink = spawn([sink_bin, out_port, idle_ms, seconds * 4 + 60], log=work / "sink.out")
        relay_report: dict[str, Any] = {}
        try:
            wait_udp_bound(out_port, 10.0, sink)
            in_host, in_port = relay.start((LOOPBACK, out_port))
            meter = CpuMeter(relay.pids).start()
            gen = spawn([gen_bin, in_port, seconds, f"{rate_pps:g}", size, in_host],
                        log=work / "gen.out")
            gen_rc, _ = wait_for(gen, seconds + 30, tick)
            # The sink ends by itself IDLE_MS after the last packet.
            sink_rc, _ = wait_for(sink, idle_ms / 1000 + 30)
            relay_cpu = meter.stop()
        finally:
            relay_report = relay.stop()
            stop_process(sink, timeout=3.0)
        gen_report = last_json_line(work / "gen.out") or {}
        sink_report = last_json_line(work / "sink.out") or {}
    if gen_rc != 0 or sink_rc != 0 or not gen_report or not sink_report:
        raise BenchError(f"generator/sink run failed (gen rc={gen_rc}, sink rc={sink_rc})")
    sent = int(gen_report.get("sent", 0))
    delivered = int(sink_report.get("received", 0))
    relayed = relay_report.get("relayed")
    return {
        "relay": relay.name,
        "seconds": seconds,
        "rate_pps": rate_pps or "max",
        "size": size,
        "sent": sent,
        "relayed": relayed,
        "delivered": delivered,
        "sent_pps": gen_report.get("pps"),
        "relay_pps": relay_report.get("pps"),
        "delivered_pps": sink_report.get("pps"),
        "loss_pct": round(100.0 * (1 - delivered / sent), 2) if sent else None,
        "relay_cpu_s": round(relay_cpu, 3),
        "relay_cpu_ns_per_pkt": round(relay_cpu * 1e9 / delivered, 1) if delivered else None,
    }


# --------------------------------------------------------------------------- results


def timestamp() -> str:
    return _dt.datetime.now().strftime("%Y%m%d-%H%M%S")


def result_paths(name: str, results_dir: Path | None = None) -> tuple[Path, Path]:
    """bench/results/NAME-TIMESTAMP.json and .png (the directory is created)."""
    directory = Path(results_dir or RESULTS_DIR)
    directory.mkdir(parents=True, exist_ok=True)
    stem = f"{name}-{timestamp()}"
    # Two runs within the same second get files of their own.
    n = 1
    while (directory / f"{stem}.json").exists() or (directory / f"{stem}.png").exists():
        n += 1
        stem = f"{name}-{timestamp()}-{n}"
    return directory / f"{stem}.json", directory / f"{stem}.png"


def write_json(path: Path, result: dict[str, Any]) -> None:
    path.write_text(json.dumps(result, indent=2) + "\n")


def report(name: str, result: dict[str, Any], args: Any, started: float,
           argv: Sequence[str] | None, plot: Callable[[Path], bool],
           extra: dict[str, Any] | None = None,
           meta: Callable[[], dict[str, Any]] | None = None) -> None:
    """A driver's last step: print RESULT as one JSON line on stdout.

    Unless --no-files, first write bench/results/NAME-TIMESTAMP.json (in --results-dir) and
    the PNG that PLOT(path) draws, and name them in RESULT ("json", "png": the latter only
    when PLOT returns True).  The file holds RESULT, then EXTRA (detail kept out of the
    printed line), then "meta": the machine, the start time, what META() returns and the
    driver's arguments.  META is called only when the files are written.
    """
    if not args.no_files:
        json_path, png_path = result_paths(name, args.results_dir)
        if plot(png_path):
            result["png"] = str(png_path)
        result["json"] = str(json_path)
        write_json(json_path, {**result, **(extra or {}), "meta": {
            **machine_info(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
            **(meta() if meta is not None else {}),
            "argv": sys.argv[1:] if argv is None else list(argv)}})
    print(json.dumps(result), flush=True)


def report_line(name: str, result: dict[str, Any], args: Any) -> None:
    """Print RESULT as one JSON line and, unless --no-files, write that same line to
    bench/results/NAME-TIMESTAMP.json (in --results-dir)."""
    line = json.dumps(result)
    print(line, flush=True)
    if not args.no_files:
        json_path, _ = result_paths(name, args.results_dir)
        json_path.write_text(line + "\n")


def machine_info() -> dict[str, Any]:
    """What the numbers depend on: cores, CPU model, kernel, load when the run started."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "loadavg": list(os.getloadavg()),
    }


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (no display needed), or None if not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save_figure(plt: Any, fig: Any, path: Path) -> bool:
    """Lay FIG out, write it to PATH as a PNG and free it; True (a plot was written)."""
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


_METRIC_LINE = re.compile(r"^([a-z_]+)(\{[^}]*\})? ([-+0-9.e]+)$")


def scrape_metrics(url: str, timeout: float) -> dict[str, float]:
    """A Prometheus text page as {'name{labels}': value}; comments are left out."""
    with urllib.request.urlopen(url, timeout=timeout) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = _METRIC_LINE.match(line)
        if m:
            out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return out


def check_rate_args(p: Any, args: Any) -> None:
    """--rates as args.rate_list (packets/s, 0 = flat out), checked with --seconds,
    --repeat and --size; p.error() on a bad value."""
    try:
        args.rate_list = [int(float(r)) for r in args.rates.split(",") if r.strip()]
    except ValueError:
        p.error("--rates takes numbers separated by commas")
    if not args.rate_list or min(args.rate_list) < 0:
        p.error("--rates needs rates of 0 (flat out) or more")
    if args.seconds <= 0 or args.repeat < 1 or not 12 <= args.size <= 1500:
        p.error("--seconds must be positive, --repeat at least 1, --size 12..1500")


def add_result_file_args(p: Any) -> None:
    """--results-dir and --no-files, for a benchmark that writes its JSON and PNG."""
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR,
                   help="where the JSON and PNG go (default: bench/results)")
    p.add_argument("--no-files", action="store_true",
                   help="print the JSON line only, write no result files")


def summarize(values: Sequence[float]) -> dict[str, float] | None:
    """median/min/max of a few repeated measurements."""
    if not values:
        return None
    return {"median": round(statistics.median(values), 2), "min": round(min(values), 2),
            "max": round(max(values), 2)}


# --------------------------------------------------------------------------- progress

PROGRESS_ENV = "BATON_BENCH_PROGRESS"
PROGRESS_PREFIX = "@progress "


@dataclass
class Progress:
    """A one-line progress bar on stderr; on a non-terminal only finished items are shown."""

    total: float
    width: int = 28
    stream: Any = field(default=sys.stderr)
    _last: float = 0.0

    def __post_init__(self) -> None:
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())
        # Under `baton bench` the driver's stderr is a pipe: it reports its fraction done
        # as lines of its own, which the command folds into one bar across repetitions.
        self._report = os.environ.get(PROGRESS_ENV) == "1"

    def show(self, done: float, note: str = "") -> None:
        if not (self._tty or self._report):
            return
        now = time.monotonic()
        if now - self._last < (0.25 if self._report else 0.1):
            return
        self._last = now
        if self._report:
            frac = min(1.0, max(0.0, done / self.total)) if self.total else 1.0
            self.stream.write(f"{PROGRESS_PREFIX}{frac:.4f} {note}\n")
            self.stream.flush()
            return
        self._draw(done, note)

    def _draw(self, done: float, note: str) -> None:
        frac = min(1.0, max(0.0, done / self.total)) if self.total else 1.0
        filled = int(frac * self.width)
        bar = "#" * filled + "." * (self.width - filled)
        self.stream.write(f"\r[{bar}] {frac * 100:5.1f}% {note}\x1b[K")
        self.stream.flush()

    def note(self, message: str) -> None:
        """A line of its own, printed above the bar."""
        if self._tty and not self._report:
            self.stream.write("\r\x1b[K")
        self.stream.write(message + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self._tty and not self._report:
            self.stream.write("\r\x1b[K")
            self.stream.flush()


# --------------------------------------------------------------------------- reports


def dig(data: Any, path: str) -> Any:
    """The value at a dotted PATH in nested dicts ('baseline.c_cpu_ns_per_pkt'), or None."""
    for part in path.split("."):
        if not isinstance(data, dict) or part not in data:
            return None
        data = data[part]
    return data


def spread(values: Sequence[float]) -> dict[str, Any] | None:
    """median/min/max and the values themselves, of the repetitions that produced a number."""
    nums = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    summary = summarize(nums)
    if summary is None:
        return None
    return {**summary, "values": nums}


def _short(value: float) -> str:
    """1864476 -> '1.86 M', 12345 -> '12.3 k', 4.2 -> '4.2'."""
    for limit, suffix in ((1e9, " G"), (1e6, " M"), (1e4, " k")):
        if abs(value) >= limit:
            return f"{value / (limit if limit != 1e4 else 1e3):.3g}{suffix}"
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"


def summary_plot(path: Path, title: str, panels: Sequence[dict[str, Any]]) -> bool:
    """One panel per figure: the median of the repetitions as a bar with their min..max,
    every repetition as a dot, and the baseline measured in the same command beside it.

    A panel is {"label", "unit", "bars": [{"label", "values": [...]}, ...]}, or a line chart
    {"label", "unit", "xlabel", "series": [{"label", "x": [...], "y": [...]}, ...]} (e.g.
    achieved against offered calls per second, one line per repetition and server).  Returns
    False when matplotlib is missing or there is nothing to draw.
    """
    plt = pyplot()
    panels = [p for p in panels
              if any(b.get("values") for b in p.get("bars", ()))
              or any(sr.get("x") for sr in p.get("series", ()))]
    if plt is None or not panels:
        return False
    cols = min(3, len(panels))
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.8 * rows), squeeze=False)
    colors = ("tab:blue", "tab:orange", "tab:green", "tab:red")
    for ax, panel in zip([a for row in axes for a in row], panels):
        if "series" in panel:
            for i, sr in enumerate(panel["series"]):
                ax.plot(sr["x"], sr["y"], "o-", color=colors[sr.get("color", i) % len(colors)],
                        label=sr["label"], markersize=4, alpha=0.8)
            ax.set_title(panel["label"], fontsize=10)
            ax.set_xlabel(panel.get("xlabel", ""), fontsize=8)
            ax.set_ylabel(panel.get("unit", ""))
            ax.set_ylim(bottom=0)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
            continue
        names, medians, lows, highs = [], [], [], []
        for i, bar in enumerate(panel["bars"]):
            values = bar.get("values") or []
            names.append(bar["label"])
            if not values:
                medians.append(0.0)
                lows.append(0.0)
                highs.append(0.0)
                continue
            med = statistics.median(values)
            medians.append(med)
            lows.append(med - min(values))
            highs.append(max(values) - med)
            ax.plot([i] * len(values), values, "o", color="black", markersize=4, zorder=3)
        ax.bar(range(len(names)), medians, yerr=[lows, highs], capsize=6,
               color=[colors[i % len(colors)] for i in range(len(names))], alpha=0.8)
        for i, med in enumerate(medians):
            if med:
                ax.annotate(_short(med), (i, med), textcoords="offset points", xytext=(0, 4),
                            ha="center", fontsize=8)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, fontsize=8)
        ax.set_title(panel["label"], fontsize=10)
        ax.set_ylabel(panel.get("unit", ""))
        ax.set_ylim(bottom=0)
        ax.grid(True, axis="y", alpha=0.3)
    for ax in [a for row in axes for a in row][len(panels):]:
        ax.set_visible(False)
    fig.suptitle(title)
    return save_figure(plt, fig, path)
