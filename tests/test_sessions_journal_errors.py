"""The Sessions API reading the session journal: a journal it cannot read is an
INTERNAL error with a log line, never a session that is "not found"."""
from __future__ import annotations

import asyncio
import logging
import os
from types import SimpleNamespace

import grpc
import pytest

from control.sessions_api import SessionsService


class Aborted(Exception):
    pass


class Context:
    def __init__(self):
        self.code = None

    async def abort(self, code, message):
        self.code, self.message = code, message
        raise Aborted(message)


def _service(data_dir: str) -> SessionsService:
    engine = SimpleNamespace(store=None, cfg=SimpleNamespace(data_dir=data_dir))
    return SessionsService(engine, authority=None, hub=None)


def test_an_unreadable_journal_is_internal_not_not_found(tmp_path, caplog):
    with open(os.path.join(tmp_path, "sessions.db"), "wb") as f:
        f.write(b"this is not a database" * 100)
    ctx = Context()
    with caplog.at_level(logging.ERROR, logger="baton.control.sessions"):
        with pytest.raises(Aborted):
            asyncio.run(_service(str(tmp_path))._journal(ctx, "S0123456789abcdef"))
    assert ctx.code == grpc.StatusCode.INTERNAL
    assert "journal" in ctx.message
    assert any("could not be read" in r.getMessage() for r in caplog.records)


def test_no_journal_yet_is_not_found(tmp_path):
    ctx = Context()
    assert asyncio.run(_service(str(tmp_path))._journal(ctx, "S0123456789abcdef")) is None
    assert ctx.code is None
