"""Apps: container flows of nodes (module + params) wired by outlets.

An outlet or event target is one of
- the name of another node of the same app;
- a module code (`baton.hold`, `acme.survey`), optionally `module:CODE`;
- a SIP or tel URI (`sip:bob@example.com`): bridge the caller to it;
- an HTTP(S) URI: run the instruction document there;
- `hangup`: end the call.
"""
from __future__ import annotations

from dataclasses import dataclass, field

HANGUP = "hangup"


@dataclass
class Node:
    name: str
    module: str
    params: dict = field(default_factory=dict)
    outlets: dict = field(default_factory=dict)
    events: dict = field(default_factory=dict)
    app: "App | None" = None

    def target_of(self, outlet: str):
        return self.outlets.get(outlet)


@dataclass
class App:
    name: str
    start: str
    nodes: dict = field(default_factory=dict)
    vars: dict = field(default_factory=dict)
    events: dict = field(default_factory=dict)   # app-wide event mapping


def adhoc_node(target: str, params: dict | None = None, app: App | None = None) -> Node | None:
    """The node an outlet target names when it is not a node of the app."""
    params = dict(params or {})
    if target.startswith("module:"):
        return Node(name=target, module=target[7:], params=params, app=app)
    low = target.lower()
    if low.startswith(("sip:", "sips:", "tel:")):
        params.setdefault("to", target)
        return Node(name=target, module="baton.bridge", params=params, app=app)
    if low.startswith(("http://", "https://")):
        params.setdefault("url", target)
        return Node(name=target, module="baton.instructions", params=params, app=app)
    if "." in target and " " not in target:
        return Node(name=target, module=target, params=params, app=app)
    return None


def resolve(app: App | None, target: str, params: dict | None = None) -> Node | str | None:
    """A node of `app`, an ad-hoc node, HANGUP, or None when the target means nothing."""
    if target == HANGUP:
        return HANGUP
    if app is not None and target in app.nodes:
        node = app.nodes[target]
        if params:
            return Node(node.name, node.module, {**node.params, **params}, node.outlets,
                        node.events, app)
        return node
    return adhoc_node(target, params, app)


def configured(engine, node) -> bool:
    """True when `node` is one the operator configured (an app's node, or a number's
    route), not one a document or an API call made: only those reach internal settings
    and the operator's files."""
    app = node.app
    if app is not None and app.nodes.get(node.name) is node:
        return True
    return any(n is node for _, n in getattr(engine, "_route_nodes", {}).values())
