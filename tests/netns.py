"""Loopback-only network namespaces for tests that must not reach the network.

Inside a fresh namespace the only interface is `lo`; a datagram for any other
address fails with "Network is unreachable", so a message that names foreign
hosts (RFC 4475's `example.com`, `192.0.2.x`, `255.255.255.255`) cannot make a
buggy engine send traffic off the machine.
"""
from __future__ import annotations

import os
import secrets
import shutil
import subprocess


class NetnsUnavailable(Exception):
    """Namespaces cannot be created here (not root, no `ip`, no kernel support)."""


class Netns:
    def __init__(self, prefix: str = "baton-test"):
        # Unique per process and instance: parallel runs must not share one.
        self.name = f"{prefix}-{os.getpid()}-{secrets.token_hex(3)}"
        self.created = False

    def create(self) -> "Netns":
        if os.geteuid() != 0:
            raise NetnsUnavailable("network namespaces need root")
        if shutil.which("ip") is None:
            raise NetnsUnavailable("`ip` (iproute2) is not installed")
        r = subprocess.run(["ip", "netns", "add", self.name], capture_output=True, text=True)
        if r.returncode != 0:
            raise NetnsUnavailable(f"`ip netns add` failed: {r.stderr.strip()}")
        self.created = True
        try:
            # A new namespace has `lo` down: even 127.0.0.1 is unreachable until it is up.
            self.run(["ip", "link", "set", "lo", "up"], check=True, capture_output=True)
        except subprocess.CalledProcessError as exc:
            self.destroy()
            raise NetnsUnavailable(f"cannot bring lo up: {exc.stderr!r}") from exc
        return self

    def cmd(self, argv: list) -> list:
        """`argv` as run inside the namespace."""
        return ["ip", "netns", "exec", self.name, *argv]

    def run(self, argv: list, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(self.cmd(argv), **kw)

    def destroy(self) -> None:
        if self.created:
            subprocess.run(["ip", "netns", "del", self.name], capture_output=True)
            self.created = False

    def __enter__(self) -> "Netns":
        return self.create()

    def __exit__(self, *exc) -> None:
        self.destroy()
