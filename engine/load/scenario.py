"""Load scenarios: the caller side of a call as a Baton app.

A scenario has the shape of an `[apps.NAME]` table of the engine's config: a `start`
node and `[nodes.NAME]` tables, each a module code with `params` and `outlets`
(outlet -> next node, or `hangup`). The modules are the caller-side steps below;
each returns one outlet. A node without a wired outlet for what happened ends the
call (BYE), as `hangup` does.
"""
from __future__ import annotations

import tomllib
from pathlib import Path

from engine.sessions.apps import HANGUP, App, Node

# module code -> (its params and their types, its outlets)
MODULES: dict[str, tuple[dict, tuple]] = {
    "load.hold": ({"seconds": (int, float)}, ("done",)),
    "load.play": ({"wav": str, "tone": (int, float), "seconds": (int, float),
                   "probe": bool}, ("done",)),
    "load.wait": ({"for": str, "timeout": (int, float), "min_ms": int,
                   "threshold": int}, ("heard", "timeout")),
    "load.digits": ({"digits": str, "inband": bool, "duration_ms": int, "gap_ms": int},
                    ("done",)),
    "load.expect_digits": ({"digits": str, "timeout": (int, float)},
                           ("matched", "mismatch", "timeout")),
    "load.echo_check": ({"seconds": (int, float), "min_correlation": (int, float)},
                        ("pass", "fail")),
    "load.hangup": ({}, ()),
}
WAIT_FOR = ("speech", "tone", "silence")

BUILTIN: dict[str, dict] = {
    # Answer, keep the call up for --hold seconds (sending silence), hang up.
    "answer-hold": {"start": "hold", "nodes": {
        "hold": {"module": "load.hold", "outlets": {"done": "hangup"}}}},
    # Play a known signal, correlate what comes back (an echo), keep the call up.
    "echo-check": {"start": "check", "nodes": {
        "check": {"module": "load.echo_check", "outlets": {"pass": "hold", "fail": "hold"}},
        "hold": {"module": "load.hold", "outlets": {"done": "hangup"}}}},
    # Wait for a prompt, press 1, expect the next prompt after the first one ends.
    "ivr-walk": {"start": "prompt", "nodes": {
        "prompt": {"module": "load.wait", "params": {"for": "speech", "timeout": 10},
                   "outlets": {"heard": "press"}},
        "press": {"module": "load.digits", "params": {"digits": "1"},
                  "outlets": {"done": "next"}},
        "next": {"module": "load.wait", "params": {"for": "speech", "timeout": 10},
                 "outlets": {"heard": "hold"}},
        "hold": {"module": "load.hold", "params": {"seconds": 1}}}},
    # Send digits in-band and expect the same digits back (an echo).
    "dtmf-roundtrip": {"start": "send", "nodes": {
        "send": {"module": "load.digits", "params": {"digits": "1234567890*#", "inband": True},
                 "outlets": {"done": "expect"}},
        "expect": {"module": "load.expect_digits",
                   "params": {"digits": "1234567890*#", "timeout": 3},
                   "outlets": {"matched": "hold", "mismatch": "hold", "timeout": "hold"}},
        "hold": {"module": "load.hold", "outlets": {"done": "hangup"}}}},
}


class ScenarioError(Exception):
    """A scenario that does not load: the message names the file and the key."""


def load(name_or_path: str) -> App:
    """A built-in scenario by name, or a TOML file."""
    if name_or_path in BUILTIN:
        return parse(BUILTIN[name_or_path], name_or_path)
    path = Path(name_or_path)
    if not path.is_file():
        raise ScenarioError(f"{name_or_path}: no such scenario (built-in: "
                            f"{', '.join(BUILTIN)}; or a TOML file)")
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ScenarioError(f"{path}: {exc}") from None
    return parse(raw, str(path))


def parse(raw: dict, where: str) -> App:
    for k in raw:
        if k not in ("start", "nodes", "vars"):
            raise ScenarioError(f"{where}: unknown key {k!r} (start, nodes, vars)")
    nodes = raw.get("nodes")
    if not isinstance(nodes, dict) or not nodes:
        raise ScenarioError(f"{where}: nodes: a scenario needs at least one node")
    start = raw.get("start")
    if start not in nodes:
        raise ScenarioError(f"{where}: start: must name one of its nodes ({', '.join(nodes)})")
    app = App(name=where, start=start, vars=dict(raw.get("vars", {})))
    for name, n in nodes.items():
        key = f"{where}: nodes.{name}"
        if not isinstance(n, dict):
            raise ScenarioError(f"{key}: expected a table")
        for k in n:
            if k not in ("module", "params", "outlets"):
                raise ScenarioError(f"{key}: unknown key {k!r} (module, params, outlets)")
        code = n.get("module")
        if code not in MODULES:
            raise ScenarioError(f"{key}.module: unknown module {code!r} "
                                f"(one of {', '.join(MODULES)})")
        kinds, outlets = MODULES[code]
        params, wired = n.get("params", {}), n.get("outlets", {})
        if not isinstance(params, dict) or not isinstance(wired, dict):
            raise ScenarioError(f"{key}: params and outlets are tables")
        for p, v in params.items():
            if p not in kinds:
                raise ScenarioError(f"{key}.params.{p}: unknown parameter of {code} "
                                    f"({', '.join(kinds) or 'none'})")
            if not isinstance(v, kinds[p]) or isinstance(v, bool) != (kinds[p] is bool):
                raise ScenarioError(f"{key}.params.{p}: wrong type {type(v).__name__}")
        if code == "load.wait" and params.get("for", "speech") not in WAIT_FOR:
            raise ScenarioError(f"{key}.params.for: one of {', '.join(WAIT_FOR)}")
        if code in ("load.digits", "load.expect_digits"):
            from engine.media.commands.digits import valid

            if not valid(str(params.get("digits", "")), pause=code == "load.digits"):
                raise ScenarioError(f"{key}.params.digits: DTMF keys 0-9 * # A-D")
        if code == "load.play":
            wav = params.get("wav")
            if wav is not None and not Path(wav).is_file():
                raise ScenarioError(f"{key}.params.wav: no such file {wav!r}")
        for o, target in wired.items():
            if o not in outlets:
                raise ScenarioError(f"{key}.outlets.{o}: {code} has no outlet {o!r} "
                                    f"({', '.join(outlets) or 'none'})")
            if target != HANGUP and target not in nodes:
                raise ScenarioError(f"{key}.outlets.{o}: {target!r} is neither a node nor "
                                    f"{HANGUP!r}")
        app.nodes[name] = Node(name, code, dict(params), dict(wired), {}, app)
    return app


def uses_inband_detection(app: App) -> bool:
    return any(n.module == "load.expect_digits" for n in app.nodes.values())
