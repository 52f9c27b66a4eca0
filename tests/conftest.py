"""Test setup shared by every suite.

`async def` tests run on uvloop (BATON_TEST_LOOP=asyncio runs them on the
stock loop), and a test fails if any exception reached the loop's exception
handler, even one nobody awaited.
"""
from __future__ import annotations

import asyncio
import inspect
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Tests fork peers (PJSIP, SIPp) from a loop that also runs gRPC clients; the
# children exec at once and never use gRPC, and gRPC's fork handlers can crash
# a child forked while a gRPC thread is busy.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# No test depends on today's date: every process the suite starts (and this
# one) reads billing's wall clock (engine/common/clock.py) as if the suite had
# started at SUITE_START, far from any period's edge. Set before the engine is
# imported, and inherited by every child.
SUITE_START_S = 1_925_640_000                     # 2031-01-08T12:00:00Z (not a leap year)
os.environ["BATON_CLOCK_SHIFT_NS"] = str(SUITE_START_S * 1_000_000_000 - __import__("time").time_ns())


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running (talk-off corpus, soak)")


def new_loop() -> asyncio.AbstractEventLoop:
    if os.environ.get("BATON_TEST_LOOP") == "asyncio":
        return asyncio.new_event_loop()
    import uvloop

    return uvloop.new_event_loop()


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    func = pyfuncitem.obj
    if not inspect.iscoroutinefunction(func):
        return None
    args = {name: pyfuncitem.funcargs[name] for name in pyfuncitem._fixtureinfo.argnames}
    loop = new_loop()
    errors = []

    def handler(loop, context):
        errors.append(context)

    loop.set_exception_handler(handler)
    try:
        loop.run_until_complete(asyncio.wait_for(func(**args), timeout=120))
        # Let callbacks scheduled by the test run, so their errors are seen.
        loop.run_until_complete(asyncio.sleep(0))
    finally:
        pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
        for t in pending:
            t.cancel()
        if pending:
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.close()
    if errors:
        msgs = "; ".join(f"{c.get('message')}: {c.get('exception')!r}" for c in errors)
        pytest.fail(f"exceptions reached the event loop's handler: {msgs}")
    return True


@pytest.fixture(autouse=True)
def _restore_root_logging():
    """A test that runs a command in-process (`cli.main`) points the root logger at
    the stderr pytest captured for that test; put the handlers back afterwards."""
    import logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
    for h in handlers:
        if h not in root.handlers:
            root.addHandler(h)
    root.setLevel(level)


@pytest.fixture
def billing_time():
    """Travel billing's wall clock to an instant (ns since the epoch, UTC) with
    time-machine: `billing_time(at_ns, tick=False)`; the clock reads `at_ns`."""
    import time_machine

    from engine.common import clock

    travellers = []

    def travel(at_ns: int, tick: bool = False):
        if travellers:
            travellers.pop().stop()
        t = time_machine.travel((at_ns - clock.SHIFT_NS) / 1e9, tick=tick)
        t.start()
        travellers.append(t)
        return t

    yield travel
    for t in travellers:
        t.stop()
