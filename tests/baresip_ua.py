"""A headless baresip for the tests, over loopback.

baresip runs from a config directory made for the test and is driven
through its `stdio` module: every byte on its stdin is a menu key, so only
whole `/command` lines are written to it. `-s` makes it print every SIP
message it sends and receives, which is how the tests see the other side's
answers (the 200 to BYE included).

baresip 1.0 binds SIP to `sip_listen` and takes its advertised address from
`net_interface`, both 127.0.0.1 here; it binds RTP (and its idle DNS
client) to the wildcard address, but sends RTP only where the other side's
SDP says, 127.0.0.1. There is no null audio player in the Debian package's
modules: without `audio_player` the received audio is simply not played.

Two ways to answer, for `baton load`:
- `auto_answer=True`: the account's `answermode=auto`; it sends its audio
  source, a 440 Hz tone played by `aufile`, and drops what it receives.
- `echo=True`: the `echo` module answers every call itself and sends back
  what it receives: it points the call's player and source at one `aubridge`
  device, so the audio goes out again about 60 ms after it came in.
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

from tests.helpers import free_port

BARESIP = shutil.which("baresip")
MODULES = "/usr/lib/baresip/modules"
needs_baresip = pytest.mark.skipif(BARESIP is None or not os.path.isdir(MODULES),
                                   reason="baresip is not installed")

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def tone_wav(path, seconds: int = 30) -> None:
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
    """A headless baresip in its own config directory, stopped on exit. Its
    account is `sip:test@127.0.0.1` (no registration): calls to it are
    `sip:test@127.0.0.1:PORT`."""

    USER = "test"

    def __init__(self, tmp_path, *, auto_answer: bool = False, echo: bool = False):
        self.dir = tmp_path / "baresip"
        self.dir.mkdir()
        self.port = free_port()
        rtp = free_port(even=True)
        if echo:
            audio = ["audio_source aubridge,echo", "audio_player aubridge,echo",
                     "module aubridge.so"]
        else:
            tone = self.dir / "tone.wav"
            tone_wav(tone)
            audio = [f"audio_source aufile,{tone}", "module aufile.so"]
        (self.dir / "config").write_text("\n".join([
            "poll_method epoll",
            f"sip_listen 127.0.0.1:{self.port}",
            # An address, not `lo`: baresip 1.0 finds no address on `lo` by name.
            "net_interface 127.0.0.1",
            "dns_server 127.0.0.1:53",
            f"rtp_ports {rtp}-{rtp + 40}",
            f"module_path {MODULES}",
            "module stdio.so",
            "module g711.so",
            *audio,
            "module_app account.so",
            "module_app contact.so",
            "module_app menu.so",
            *(["module_app echo.so"] if echo else []),
            "",
        ]))
        # No registration: regint=0.
        params = ";regint=0" + (";answermode=auto" if auto_answer else "")
        (self.dir / "accounts").write_text(f"<sip:{self.USER}@127.0.0.1>{params}\n")
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
