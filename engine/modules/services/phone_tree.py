"""`baton.phone_tree`: nested DTMF menus configured in one node's params.

    [apps.main.nodes.tree]
    module = "baton.phone_tree"
    outlets = { sales = "sales-desk", timeout = "goodbye" }
    [apps.main.nodes.tree.params]
    start = "main"
    timeout = 5                      # seconds to wait for a key after a prompt
    retries = 2                      # prompts repeated after a wrong key or no key
    invalid_prompt = "Sorry, that is not a valid choice."
    [apps.main.nodes.tree.params.menus.main]
    prompt = "For sales press 1. For support press 2."
    choices = { "1" = "outlet:sales", "2" = "menu:support", "0" = "sip:operator@example.com" }
    [apps.main.nodes.tree.params.menus.support]
    prompt_file = "/srv/prompts/support.wav"
    choices = { "1" = "support-queue", "*" = "back" }

A choice leads to
- `menu:NAME`: another menu of the tree; `back`: the menu before; `repeat`: this one again;
- `outlet:NAME`: leave through the node's outlet NAME (with `Digits`, `PhoneTreePath`);
- anything else an app outlet may name: a node of the app, a module code, a SIP/tel
  or http(s) URI, or `hangup`. A bare name that is a wired outlet of the node is
  that outlet.

A key with no choice is invalid: `invalid_prompt` and the menu again; no key within
`timeout` seconds: `timeout_prompt` (if any) and the menu again. After `retries`
repeats the menu's `on_timeout` / `on_invalid` target is followed, else the node's
`timeout` outlet (the `invalid` outlet for wrong keys when it is wired). A key
during a prompt stops it (barge-in). `prompt`, `prompt_file`, `timeout`,
`retries`, `voice`, `language`, `invalid_prompt`, `timeout_prompt` may be set
per menu, over the node's defaults.

The path through the tree is in the session's params (`PhoneTreePath`, e.g.
`main/support`) and each menu entered is a `phone_tree.menu` session event.
"""
from __future__ import annotations

import logging
import re

from engine.sessions.apps import HANGUP, adhoc_node
from engine.modules.services.prompting import KEYS, Prompter, PromptingModule, check_common, check_keys, check_prompt

log = logging.getLogger("baton.modules.phone_tree")

NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")
MAX_MENUS = 200
MAX_DEPTH = 64
NODE_KEYS = ("menus", "start", "voice", "language", "timeout", "retries", "invalid_prompt",
             "invalid_prompt_file", "timeout_prompt", "timeout_prompt_file")
MENU_KEYS = ("prompt", "prompt_file", "choices", "voice", "language", "timeout", "retries",
             "invalid_prompt", "invalid_prompt_file", "timeout_prompt", "timeout_prompt_file",
             "on_timeout", "on_invalid")
DEFAULT_INVALID = "Sorry, that is not a valid choice."
SPECIAL = ("back", "repeat")


def _target_kind(target: str) -> tuple[str, str]:
    """(kind, value): menu, outlet, back, repeat, or app (an app-level target)."""
    if target in SPECIAL:
        return target, ""
    if target.startswith("menu:"):
        return "menu", target[5:]
    if target.startswith("outlet:"):
        return "outlet", target[7:]
    return "app", target


class TreeState(Prompter):
    def __init__(self, ctl):
        super().__init__(ctl)
        self.menu = ""
        self.path: list[str] = []
        self.tries = 0


class PhoneTreeModule(PromptingModule):
    code = "baton.phone_tree"
    level = "service"
    outlets = ("timeout", "invalid", "any outlet named by a choice")

    # -- config -------------------------------------------------------------------
    @classmethod
    def check_params(cls, params: dict) -> None:
        check_keys(params, NODE_KEYS)
        check_common(params)
        check_prompt(params, text="invalid_prompt", file="invalid_prompt_file")
        check_prompt(params, text="timeout_prompt", file="timeout_prompt_file")
        menus = params.get("menus")
        if not isinstance(menus, dict) or not menus:
            raise ValueError("menus: a table of menus is required, e.g. "
                             "menus.main = { prompt = \"...\", choices = { \"1\" = \"outlet:sales\" } }")
        if len(menus) > MAX_MENUS:
            raise ValueError(f"menus: more than {MAX_MENUS} menus")
        start = params.get("start", "main" if "main" in menus else next(iter(menus)))
        if not isinstance(start, str) or start not in menus:
            raise ValueError(f"start: must name one of the menus ({', '.join(menus)})")
        for name, menu in menus.items():
            where = f"menus.{name}."
            if not NAME.match(name):
                raise ValueError(f"menus.{name}: a menu name is letters, digits, _ . -")
            if not isinstance(menu, dict):
                raise ValueError(f"menus.{name}: expected a table")
            check_keys(menu, MENU_KEYS, where)
            check_prompt(menu, where, required=True)
            check_prompt(menu, where, text="invalid_prompt", file="invalid_prompt_file")
            check_prompt(menu, where, text="timeout_prompt", file="timeout_prompt_file")
            check_common(menu, where)
            choices = menu.get("choices")
            if not isinstance(choices, dict) or not choices:
                raise ValueError(f"{where}choices: a table of key = target is required")
            for key, target in choices.items():
                if len(key) != 1 or key not in KEYS:
                    raise ValueError(f"{where}choices.{key}: a choice is one DTMF key of {KEYS!r}")
                cls._check_target(menus, f"{where}choices.{key}", target)
            for k in ("on_timeout", "on_invalid"):
                if k in menu:
                    cls._check_target(menus, f"{where}{k}", menu[k])

    @staticmethod
    def _check_target(menus: dict, key: str, target) -> None:
        if not isinstance(target, str) or not target.strip():
            raise ValueError(f"{key}: a target such as menu:NAME, outlet:NAME, a node, "
                             "a module code or a URI")
        kind, value = _target_kind(target)
        if kind == "menu" and value not in menus:
            raise ValueError(f"{key}: no menu {value!r} (menus: {', '.join(menus)})")
        if kind == "outlet" and not NAME.match(value):
            raise ValueError(f"{key}: {value!r} is not an outlet name")
        if kind == "app" and target != HANGUP and not NAME.match(target) and \
                adhoc_node(target) is None:
            raise ValueError(f"{key}: {target!r} is neither a menu, an outlet, a node, "
                             "a module code nor a URI")

    @classmethod
    def targets(cls, params: dict):
        """(param key, target) of every choice that names something of the app
        (a node, a module code, a URI): the config checks them like outlets."""
        for name, menu in (params.get("menus") or {}).items():
            if not isinstance(menu, dict):
                continue
            items = [(f"menus.{name}.choices.{k}", t) for k, t in (menu.get("choices") or {}).items()]
            items += [(f"menus.{name}.{k}", menu[k]) for k in ("on_timeout", "on_invalid") if k in menu]
            for key, target in items:
                if isinstance(target, str) and _target_kind(target)[0] == "app":
                    yield key, target

    # -- the calls ----------------------------------------------------------------
    def take(self, ctl) -> None:
        if self.begin(ctl, TreeState) is None:
            return
        menus = ctl.params["menus"]
        start = ctl.params.get("start", "main" if "main" in menus else next(iter(menus)))
        self._enter(ctl, start)

    def _enter(self, ctl, name: str, prefix=None) -> None:
        state = ctl.state
        if len(state.path) >= MAX_DEPTH:
            del state.path[: len(state.path) - MAX_DEPTH + 1]
        state.path.append(name)
        state.menu = name
        state.tries = 0
        session = ctl.session
        session.params["PhoneTreeMenu"] = name
        session.params["PhoneTreePath"] = "/".join(state.path)
        if ctl.engine.listeners:
            ctl.engine.notify(session, "phone_tree.menu",
                              {"node": ctl.node.name, "menu": name, "path": "/".join(state.path)})
        self._prompt(ctl, prefix)

    def _prompt(self, ctl, prefix=None) -> None:
        state = ctl.state
        menu = ctl.params["menus"][state.menu]
        state.tries += 1
        parts = []
        if prefix is not None:
            parts.append(prefix)
        parts.append((menu.get("prompt"), menu.get("prompt_file")))
        state.ask(parts, lambda digits, why: self._answer(ctl, digits, why),
                  max_digits=1, timeout=float(self.opt(ctl, menu, "timeout", 5)),
                  voice=self.opt(ctl, menu, "voice", "en"),
                  language=self.opt(ctl, menu, "language"))

    def _answer(self, ctl, digits: str, why: str) -> None:
        state = ctl.state
        menu = ctl.params["menus"][state.menu]
        retries = int(self.opt(ctl, menu, "retries", 2))
        if digits:
            ctl.session.params["Digits"] = digits
            target = menu["choices"].get(digits)
            if target is not None:
                self._follow(ctl, target, digits)
                return
            if state.tries > retries:
                if "on_invalid" in menu:
                    self._follow(ctl, menu["on_invalid"], digits)
                else:
                    self._leave(ctl, "invalid" if "invalid" in ctl.node.outlets else "timeout",
                                digits)
                return
            prefix = (self.opt(ctl, menu, "invalid_prompt"), self.opt(ctl, menu, "invalid_prompt_file"))
            if prefix == (None, None):
                prefix = (DEFAULT_INVALID, None)
            self._prompt(ctl, prefix)
            return
        if state.tries > retries:
            if "on_timeout" in menu:
                self._follow(ctl, menu["on_timeout"], "")
            else:
                self._leave(ctl, "timeout", "")
            return
        prefix = (self.opt(ctl, menu, "timeout_prompt"), self.opt(ctl, menu, "timeout_prompt_file"))
        self._prompt(ctl, None if prefix == (None, None) else prefix)

    def _follow(self, ctl, target: str, key: str) -> None:
        state = ctl.state
        kind, value = _target_kind(target)
        if kind == "menu":
            self._enter(ctl, value)
        elif kind == "repeat":
            state.path.pop()
            self._enter(ctl, state.menu)
        elif kind == "back":
            if len(state.path) > 1:
                state.path.pop()
                self._enter(ctl, state.path.pop())
            else:
                state.path.pop()
                self._enter(ctl, state.menu)
        elif kind == "outlet":
            self._leave(ctl, value, key)
        elif target in ctl.node.outlets:
            self._leave(ctl, target, key)
        else:
            ctl.transfer(target, f"choice:{key}" if key else "choice",
                         Digits=key, PhoneTreePath="/".join(state.path))

    def _leave(self, ctl, outlet: str, key: str) -> None:
        ctl.release(outlet, Digits=key, PhoneTreePath="/".join(ctl.state.path))


__all__ = ["PhoneTreeModule"]
