"""Interoperability with baresip over loopback.

baresip runs headless from a config directory made for the test and is
driven through its `stdio` module: every byte on its stdin is a menu key,
so only whole `/command` lines are written to it. `-s` makes it print every
SIP message it sends and receives, which is how the tests see the engine's
answers (the 200 to BYE included).

baresip 1.0 binds SIP to `sip_listen` and takes its advertised address from
`net_interface`, both 127.0.0.1 here; it binds RTP (and its idle DNS
client) to the wildcard address, but sends RTP only where the engine's SDP
says, 127.0.0.1. There is no null audio player in the Debian package's
modules: without `audio_player` the received audio is simply not played.
"""
from __future__ import annotations

import math
import os
import re
import shutil
import struct
import subprocess
import threading
import time
import wave

import pytest

from tests.helpers import EngineProcess, free_port

BARESIP = shutil.which("baresip")
MODULES = "/usr/lib/baresip/modules"

pytestmark = [
    pytest.mark.interop,
    pytest.mark.skipif(BARESIP is None or not os.path.isdir(MODULES),
                       reason="baresip is not installed"),
]

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
BYE_OK = re.compile(r"SIP/2\.0 200 OK\r?\n(?:[^\r\n]+\r?\n)*?CSeq: *\d+ BYE")


def finish_engine(engine: EngineProcess) -> None:
    """The engine survived the peer: it answers OPTIONS, stops cleanly on
    SIGTERM and logged no traceback."""
    answered = any(engine._options_answered() for _ in range(5))
    code = engine.stop()
    out = engine.output()
    assert answered, f"engine stopped answering OPTIONS:\n{out}"
    assert code == 0, f"engine exited with {code} on SIGTERM:\n{out}"
    assert "Traceback" not in out, out


def _tone(path, seconds: int = 30) -> None:
    """An 8 kHz 16-bit mono 440 Hz tone: aufile's input. It must outlast the
    call, because baresip hangs up when its audio source ends."""
    frames = b"".join(struct.pack("<h", int(3000 * math.sin(2 * math.pi * 440 * i / 8000)))
                      for i in range(8000))
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(frames * seconds)


class Baresip:
    """A headless baresip in its own config directory, stopped on exit."""

    def __init__(self, tmp_path):
        self.dir = tmp_path / "baresip"
        self.dir.mkdir()
        self.port = free_port()
        rtp = free_port(even=True)
        tone = self.dir / "tone.wav"
        _tone(tone)
        (self.dir / "config").write_text("\n".join([
            "poll_method epoll",
            f"sip_listen 127.0.0.1:{self.port}",
            # An address, not `lo`: baresip 1.0 finds no address on `lo` by name.
            "net_interface 127.0.0.1",
            "dns_server 127.0.0.1:53",
            f"audio_source aufile,{tone}",
            f"rtp_ports {rtp}-{rtp + 40}",
            f"module_path {MODULES}",
            "module stdio.so",
            "module g711.so",
            "module aufile.so",
            "module_app account.so",
            "module_app contact.so",
            "module_app menu.so",
            "",
        ]))
        # No registration: regint=0.
        (self.dir / "accounts").write_text("<sip:test@127.0.0.1>;regint=0\n")
        (self.dir / "contacts").write_text("")
        self.buf = bytearray()
        self.lock = threading.Lock()
        # stdbuf: baresip's stdout is block-buffered on a pipe.
        cmd = [BARESIP, "-s", "-f", str(self.dir)]
        if shutil.which("stdbuf"):
            cmd = ["stdbuf", "-o0", "-e0"] + cmd
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, cwd=self.dir)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        while True:
            data = self.proc.stdout.read1(65536)
            if not data:
                return
            with self.lock:
                self.buf += data

    def output(self) -> str:
        with self.lock:
            text = self.buf.decode(errors="replace")
        return ANSI.sub("", text)

    def wait_for(self, pattern, timeout: float = 10.0, start: int = 0) -> re.Match:
        rx = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        while True:
            m = rx.search(self.output(), start)
            if m:
                return m
            if time.monotonic() > deadline or self.proc.poll() is not None:
                time.sleep(0.1)  # the reader's last bytes
                m = rx.search(self.output(), start)
                if m:
                    return m
                pytest.fail(f"baresip: no {rx.pattern!r} within {timeout}s "
                            f"(exit {self.proc.poll()}):\n{self.output()[-8000:]}")
            time.sleep(0.05)

    def command(self, line: str) -> None:
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def quit(self, timeout: float = 5.0) -> int:
        if self.proc.poll() is None:
            self.command("/quit")
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pytest.fail(f"baresip did not quit:\n{self.output()[-4000:]}")
        return self.proc.returncode

    def __enter__(self):
        try:
            self.wait_for(r"baresip is ready\.", 10)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.reader.join(2)


def _addresses(text: str) -> set[str]:
    return set(re.findall(r"(?<![\d.])\d{1,3}(?:\.\d{1,3}){3}(?![\d.])", text))


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_call_established_and_hung_up(tmp_path, transport):
    with EngineProcess() as engine, Baresip(tmp_path) as ua:
        uri = f"sip:1000@127.0.0.1:{engine.port}"
        if transport == "tcp":
            uri += ";transport=tcp"
        mark = len(ua.output())
        ua.command(f"/dial {uri}")
        ua.wait_for(r"Call established: " + re.escape(uri), 10, mark)
        out = ua.output()[mark:]
        # The answer: G.711 on loopback.
        answer = re.search(r"SIP/2\.0 200 OK\r?\n.*?CSeq: *\d+ INVITE.*?\r?\n\r?\n"
                           r"(.*?m=audio[^\r\n]*)", out, re.S)
        assert answer, out
        assert "c=IN IP4 127.0.0.1" in answer.group(1), answer.group(1)
        assert re.search(r"m=audio \d+ RTP/AVP (0|8)\b", answer.group(1)), answer.group(1)
        time.sleep(1.0)  # RTP both ways for a moment

        mark = len(ua.output())
        ua.command("/hangup")
        ua.wait_for(r"Call with " + re.escape(uri) + r" terminated", 10, mark)
        # The engine answered the BYE (it saw it and ended the call).
        ua.wait_for(BYE_OK, 10, mark)
        assert ua.quit() == 0, ua.output()[-4000:]

        trace = ua.output()
        assert _addresses(trace) == {"127.0.0.1"}, sorted(_addresses(trace))
        assert f"SIP/2.0/{transport.upper()} 127.0.0.1:{ua.port}" in trace, trace[-4000:]
        finish_engine(engine)


def test_unknown_number_is_404(tmp_path):
    with EngineProcess() as engine, Baresip(tmp_path) as ua:
        uri = f"sip:9999@127.0.0.1:{engine.port}"
        mark = len(ua.output())
        ua.command(f"/dial {uri}")
        ua.wait_for(re.escape(uri) + r": session closed: 404 Not Found", 10, mark)
        assert "Call established" not in ua.output()[mark:]
        assert ua.quit() == 0, ua.output()[-4000:]
        finish_engine(engine)
