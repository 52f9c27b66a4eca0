"""`baton.call_center`: named queues of callers served by SIP agents.

The queues and agents are configured once per engine (`[call_center]`, see
`load_config`); an app node (or a number) puts its caller in one queue:

    [apps.help.nodes.queue]
    module = "baton.call_center"
    params = { queue = "support" }
    outlets = { done = "survey", timeout = "voicemail", full = "busy" }

The caller is answered, hears the greeting, their position and estimated
wait (spoken), then hold music (a WAV file or generated tones, looping) with
the announcement repeated every `announce_every` seconds. Meanwhile the
longest-idle available agent of the queue is rung; an agent who does not
answer within `ring_timeout` is skipped and the next one rung. When an agent
answers, the session is handed down to `baton.bridge` (the basic level),
which adopts the answered agent leg; when the agent hangs up, the bridge
follows the node's `done` outlet (or a `dialled-hangup` event mapping): the
app's post-call outlet. The agent then spends `wrap_up` seconds in wrap-up
before the next call.

Outlets: `done` (after the agent hung up), `timeout` (waited `timeout`
seconds), `full` (the queue held `max_size` callers), `no-agents` (only when
wired: every agent of the queue is offline), and any DTMF key wired on the
node (the caller leaves the queue by pressing it). A caller who hangs up
while waiting counts as abandoned.

Agent states: `available`, `busy` (being rung or on a call), `wrap-up` and
`offline` (a user agent with no registration, an agent that could not be
reached, or one signed out through the API).
"""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field

import numpy as np

from engine.media.ports import PortsExhausted
from engine.sessions.session import Leg
from engine.sip import sdp
from engine.sip.errors import SdpError
from engine.sip.uac import OutgoingCall, UacOwner
from engine.modules.base import Module, answer_caller
from engine.modules.instructions.queues import Queues, QueueFull
from engine.media.commands.prompt import render_or_none, start_player

log = logging.getLogger("baton.services.call_center")

AGENT_STATES = ("available", "busy", "wrap-up", "offline")
SETTABLE_STATES = ("available", "offline")
# Final answers that say the agent cannot be reached at all (as opposed to
# "did not pick up" or "declined"): the agent goes offline for a while.
UNREACHABLE = (404, 410, 484, 503, 604)
UNREACHABLE_RETRY = 30.0
TICK = 1.0
DEFAULT_PROMPT = "You are number {position} in the queue. The estimated wait is {wait}."

QUEUE_KEYS = {
    "account": "the account whose callers and API tokens the queue serves",
    "agents": "names of [call_center.agents.NAME] serving the queue",
    "hold_music": '"tones" (generated) or the path of a WAV file, looped',
    "announce_every": "seconds between position announcements (0: on entry only)",
    "announce_position": "speak the position and estimated wait (default true)",
    "greeting": "text spoken once when the caller enters the queue",
    "position_prompt": "announcement text with {position}, {wait} and {queue}",
    "voice": "espeak-ng voice (default en)",
    "ring_timeout": "seconds an agent is rung before the next one is tried",
    "wrap_up": "seconds an agent rests after a call before the next one",
    "max_size": "callers the queue holds; one more leaves through `full`",
    "timeout": "seconds a caller waits at most; then the `timeout` outlet",
    "handle_time": "expected seconds per call, for the wait estimate before any was served",
    "text_agents_after": "seconds a caller waits before the queue's agents get a text "
                         "about it (0: never)",
}
NODE_KEYS = ("queue", "timeout")


@dataclass
class AgentConfig:
    name: str
    user: str = ""        # a [users.NAME] that registers with the engine's registrar
    uri: str = ""         # or a static SIP URI


@dataclass
class QueueConfig:
    name: str
    account: str
    agents: tuple = ()
    hold_music: str = "tones"
    announce_every: float = 30.0
    announce_position: bool = True
    greeting: str = ""
    position_prompt: str = DEFAULT_PROMPT
    voice: str = "en"
    ring_timeout: float = 15.0
    wrap_up: float = 10.0
    max_size: int = 50
    timeout: float = 600.0
    handle_time: float = 120.0
    text_agents_after: float = 0.0


@dataclass
class CenterConfig:
    agents: dict = field(default_factory=dict)   # name -> AgentConfig
    queues: dict = field(default_factory=dict)   # name -> QueueConfig


def _number(key, value, lo, hi, integer=False):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            (integer and not isinstance(value, int)):
        kind = "an integer" if integer else "a number"
        raise ValueError(f"{key}: expected {kind}, got {value!r}")
    if not lo <= value <= hi:
        raise ValueError(f"{key}: must be between {lo} and {hi}, not {value!r}")
    return value


def load_config(raw, users: dict, accounts: dict, registrar_mode: str = "open",
                base_dir: str = "") -> CenterConfig:
    """Validate the `[call_center]` table. Raises ValueError("KEY: PROBLEM")
    with KEY relative to `call_center` (e.g. `queues.support.ring_timeout`)."""
    out = CenterConfig()
    if not isinstance(raw, dict):
        raise ValueError("call_center: expected a table with agents and queues")
    for k in raw:
        if k not in ("agents", "queues"):
            raise ValueError(f"{k}: unknown key (known: agents, queues)")
    agents = raw.get("agents", {})
    if not isinstance(agents, dict):
        raise ValueError("agents: expected a table of agents")
    for name, a in agents.items():
        key = f"agents.{name}"
        if not isinstance(a, dict):
            raise ValueError(f"{key}: expected a table with user or uri")
        for k in a:
            if k not in ("user", "uri"):
                raise ValueError(f"{key}.{k}: unknown key (known: uri, user)")
        if len(set(a) & {"user", "uri"}) != 1:
            raise ValueError(f"{key}: needs exactly one of user (a registered user) or uri")
        if "user" in a:
            user = a["user"]
            if not isinstance(user, str) or user not in users:
                raise ValueError(f"{key}.user: {user!r} is not one of [users] "
                                 f"({', '.join(sorted(users)) or 'none'})")
            if registrar_mode == "off":
                raise ValueError(f"{key}.user: the registrar is off (registrar.mode), "
                                 "so the user can never register")
            out.agents[name] = AgentConfig(name, user=user)
        else:
            uri = a["uri"]
            if not isinstance(uri, str) or not uri.startswith(("sip:", "sips:")):
                raise ValueError(f"{key}.uri: a SIP URI such as sip:agent@192.0.2.1:5060")
            out.agents[name] = AgentConfig(name, uri=uri)
    queues = raw.get("queues", {})
    if not isinstance(queues, dict):
        raise ValueError("queues: expected a table of queues")
    for name, q in queues.items():
        key = f"queues.{name}"
        if not isinstance(q, dict):
            raise ValueError(f"{key}: expected a table")
        for k in q:
            if k not in QUEUE_KEYS:
                raise ValueError(f"{key}.{k}: unknown key (known: {', '.join(sorted(QUEUE_KEYS))})")
        account = q.get("account")
        if account is None:
            if len(accounts) != 1:
                raise ValueError(f"{key}.account: required when there is not exactly one account")
            account = next(iter(accounts))
        if not isinstance(account, str) or account not in accounts:
            raise ValueError(f"{key}.account: no account {account!r} "
                             f"(accounts: {', '.join(accounts) or 'none'})")
        members = q.get("agents")
        if not isinstance(members, list) or not members or \
                not all(isinstance(m, str) for m in members):
            raise ValueError(f"{key}.agents: a non-empty list of agent names")
        for m in members:
            if m not in out.agents:
                raise ValueError(f"{key}.agents: no agent {m!r} "
                                 f"(agents: {', '.join(out.agents) or 'none'})")
        qc = QueueConfig(name, account, tuple(dict.fromkeys(members)))
        music = q.get("hold_music", "tones")
        if not isinstance(music, str) or not music:
            raise ValueError(f"{key}.hold_music: \"tones\" or the path of a WAV file")
        if music != "tones":
            path = music if os.path.isabs(music) or not base_dir else os.path.join(base_dir, music)
            if not os.path.isfile(path):
                raise ValueError(f"{key}.hold_music: no such file {music!r}")
            music = path
        qc.hold_music = music
        for k, lo, hi in (("announce_every", 0, 3600), ("ring_timeout", 1, 300),
                          ("wrap_up", 0, 3600), ("timeout", 1, 86400), ("handle_time", 1, 86400),
                          ("text_agents_after", 0, 86400)):
            if k in q:
                setattr(qc, k, float(_number(f"{key}.{k}", q[k], lo, hi)))
        if "max_size" in q:
            qc.max_size = _number(f"{key}.max_size", q["max_size"], 1, 100000, integer=True)
        if "announce_position" in q:
            if not isinstance(q["announce_position"], bool):
                raise ValueError(f"{key}.announce_position: true or false")
            qc.announce_position = q["announce_position"]
        for k in ("greeting", "position_prompt", "voice"):
            if k in q:
                if not isinstance(q[k], str) or (k != "greeting" and not q[k].strip()):
                    raise ValueError(f"{key}.{k}: expected a non-empty string")
                setattr(qc, k, q[k])
        try:
            qc.position_prompt.format(position=1, wait="one minute", queue=name)
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"{key}.position_prompt: only {{position}}, {{wait}} and "
                             f"{{queue}} can be filled in ({exc})") from None
        out.queues[name] = qc
    return out


def check_routes(center: CenterConfig, apps: dict, numbers: dict) -> None:
    """Every call-centre node and number names a configured queue of its account."""
    for aname, app in apps.items():
        for nname, node in app.nodes.items():
            if node.module == CallCenterModule.code:
                q = node.params.get("queue")
                if q not in center.queues:
                    raise ValueError(f"apps.{aname}.nodes.{nname}.params.queue: no queue {q!r} "
                                     f"in [call_center.queues] "
                                     f"({', '.join(center.queues) or 'none'})")
    for number, route in numbers.items():
        if route.kind == "module" and route.target == CallCenterModule.code:
            key = f"accounts.{route.account}.numbers.{number}"
            q = route.params.get("queue")
            if q not in center.queues:
                raise ValueError(f"{key}.queue: no queue {q!r} in [call_center.queues]")
            if center.queues[q].account != route.account:
                raise ValueError(f"{key}.queue: queue {q!r} belongs to account "
                                 f"{center.queues[q].account!r}")
            CallCenterModule.check_params({k: v for k, v in route.params.items()})


# -- hold music ----------------------------------------------------------------------
_TONES = None


def hold_tones() -> np.ndarray:
    """A soft four-note phrase with a pause, 8 kHz PCM, to be looped."""
    global _TONES
    if _TONES is None:
        rate = 8000
        parts = []
        for freq in (523.25, 659.25, 783.99, 659.25, 587.33, 698.46, 880.0, 698.46):
            t = np.arange(int(rate * 0.4)) / rate
            env = np.minimum(1.0, np.minimum(t / 0.03, (0.4 - t) / 0.08))
            tone = 0.15 * 32767 * env * (np.sin(2 * np.pi * freq * t)
                                         + 0.3 * np.sin(4 * np.pi * freq * t)) / 1.3
            parts.append(tone)
        parts.append(np.zeros(rate, dtype=np.float64))
        _TONES = np.concatenate(parts).astype(np.int16)
        _TONES.setflags(write=False)
    return _TONES


def spoken_wait(seconds: float) -> str:
    if seconds < 60:
        return "less than one minute"
    minutes = math.ceil(seconds / 60)
    return f"about {minutes} minute{'s' if minutes != 1 else ''}"


# -- the runtime -----------------------------------------------------------------------
class Agent:
    """One agent's live state. `idle_since` orders available agents: the
    smallest (longest idle) is rung first."""

    def __init__(self, cfg: AgentConfig):
        self.cfg = cfg
        self.name = cfg.name
        self.state = "offline"
        self.signed_out = False
        self.unreachable_until = 0.0
        self.idle_since = time.monotonic()
        self.calls = 0
        self.session_id = ""
        self.queue = ""
        self.wrap_timer = None
        self.contact = cfg.uri


class QueueCounters:
    __slots__ = ("timed_out", "full", "handled", "handle_total")

    def __init__(self):
        self.timed_out = 0
        self.full = 0
        self.handled = 0
        self.handle_total = 0.0


class AgentLeg(Leg):
    """The agent's call leg: tells the call centre once when it is over."""

    def __init__(self, session):
        super().__init__(session, role="agent")
        self.on_release = None

    def release(self) -> None:
        super().release()
        cb, self.on_release = self.on_release, None
        if cb is not None:
            cb()


class Offer(UacOwner):
    """Ringing one agent for one waiting caller."""

    def __init__(self, center: "CallCenter", waiting: "Waiting", agent: Agent):
        self.center = center
        self.waiting = waiting
        self.agent = agent
        self.leg: AgentLeg | None = None
        self.call: OutgoingCall | None = None
        self.timer = None
        self.done = False

    def call_answered(self, call, msg) -> None:
        self.center.agent_answered(self, msg)

    def call_failed(self, call, status, msg) -> None:
        self.center.offer_failed(self, status)


class Waiting:
    """A caller in a queue: what the module holds on `ctl.state`."""

    def __init__(self, ctl, qc: QueueConfig, member):
        self.ctl = ctl
        self.qc = qc
        self.member = member
        self.player = None
        self.announcing = False
        self.task = None
        self.offer: Offer | None = None
        self.tried: set = set()       # agents who let this caller ring out this round
        self.round_over = False
        self.announcement = ""
        self.next_announcement = None


class CallCenter:
    """Every queue and agent of one engine. `CallCenter.of(engine)` makes it once."""

    def __init__(self, engine):
        self.engine = engine
        cfg = getattr(engine.cfg, "call_center", None) or CenterConfig()
        self.cfg = cfg
        self.queues = Queues()
        self.counters: dict[str, QueueCounters] = {}
        for name, qc in cfg.queues.items():
            q = self.queues.get(qc.account, name, create=True, max_size=qc.max_size)
            q.pinned = True
            self.counters[name] = QueueCounters()
        self.agents = {name: Agent(a) for name, a in cfg.agents.items()}
        self.waiting: dict[str, Waiting] = {}
        self.music: dict[str, np.ndarray] = {}
        self._dispatching = False
        self._tick_handle = None
        self.refresh()

    @classmethod
    def of(cls, engine) -> "CallCenter":
        center = engine.__dict__.get("call_center")
        if center is None:
            center = engine.call_center = cls(engine)
        return center

    # -- agents ---------------------------------------------------------------------
    def _bindings(self, users) -> dict:
        """Live registrar bindings of the given user names, oldest first: the
        registrar's per-user index of authenticated bindings, never a scan."""
        reg = self.engine.sip.registrar
        found: dict[str, list] = {}
        if reg is None or not users:
            return found
        for user in users:
            live = reg.bindings_of(user)
            if live:
                found[user] = live
        return found

    def refresh(self) -> None:
        """Bring registration and sign-in changes into the agents' states."""
        now = time.monotonic()
        registered = self._bindings({a.cfg.user for a in self.agents.values()
                                     if a.cfg.user and a.state not in ("busy", "wrap-up")})
        for a in self.agents.values():
            if a.state in ("busy", "wrap-up"):
                continue
            online = not a.signed_out and now >= a.unreachable_until
            if online and a.cfg.user:
                bindings = registered.get(a.cfg.user, [])
                online = bool(bindings)
                a.contact = bindings[-1].contact if bindings else ""
            if online and a.state == "offline":
                a.state = "available"
                a.idle_since = now
            elif not online and a.state == "available":
                a.state = "offline"

    def set_agent_state(self, name: str, state: str) -> Agent:
        """Sign an agent in (`available`) or out (`offline`). KeyError for an
        unknown agent, ValueError for another state."""
        a = self.agents[name]
        if state not in SETTABLE_STATES:
            raise ValueError(f"state: must be one of {', '.join(SETTABLE_STATES)}, not {state!r}")
        if state == "offline":
            a.signed_out = True
        else:
            a.signed_out = False
            a.unreachable_until = 0.0
            if a.state == "wrap-up":
                self._end_wrap_up(a)
        self.refresh()
        self.dispatch()
        return a

    def _target(self, a: Agent):
        if a.cfg.uri:
            return a.cfg.uri, None, None
        bindings = self._bindings({a.cfg.user}).get(a.cfg.user)
        if not bindings:
            return None
        b = bindings[-1]
        return b.contact, tuple(b.source[:2]), b.transport

    def watch(self) -> None:
        """While callers wait, look at registrations every TICK seconds: an agent
        who registers is offered the next caller without waiting for an event."""
        if self._tick_handle is None and self.waiting and self.engine.loop is not None:
            self._tick_handle = self.engine.loop.call_later(TICK, self._tick)

    def _tick(self) -> None:
        self._tick_handle = None
        for w in self.waiting.values():
            if w.round_over and w.offer is None:
                # Every free agent let this caller ring out (or refused): a new
                # round, at most once a tick, so a phone that refuses at once
                # is not rung in a tight loop.
                w.tried.clear()
                w.round_over = False
        if self.waiting:
            self.dispatch()
            self.watch()

    # -- distribution -------------------------------------------------------------------
    def dispatch(self) -> None:
        """Offer waiting callers (oldest first) to free agents (longest idle first)."""
        if self._dispatching:
            return
        self._dispatching = True
        try:
            self.refresh()
            while True:
                best = None
                for name, qc in self.cfg.queues.items():
                    q = self.queues.get(qc.account, name)
                    if q is None:
                        continue
                    for m in q.members.values():
                        w = self.waiting.get(m.session_id)
                        if w is None or w.offer is not None or not w.ctl.active:
                            continue
                        agent = self._free_agent(qc, w)
                        if agent is not None:
                            if best is None or m.enqueued < best[0].member.enqueued:
                                best = (w, agent)
                            break
                if best is None or not self._offer(*best):
                    return
        finally:
            self._dispatching = False

    def _free_agent(self, qc: QueueConfig, w: Waiting) -> Agent | None:
        free = [self.agents[n] for n in qc.agents if self.agents[n].state == "available"]
        if not free:
            return None
        fresh = [a for a in free if a.name not in w.tried]
        if not fresh:
            w.round_over = True     # the next tick starts a new round
            return None
        return min(fresh, key=lambda a: a.idle_since)

    def _offer(self, w: Waiting, agent: Agent) -> bool:
        """Ring `agent` for `w`; False when nothing more can be offered now."""
        engine = self.engine
        ctl = w.ctl
        session = ctl.session
        offer = Offer(self, w, agent)
        target = self._target(agent)
        if target is None:
            agent.state = "offline"
            return True
        leg = AgentLeg(session)
        try:
            leg.ports = engine.ports.allocate()
        except PortsExhausted:
            log.warning("session %s: no RTP ports left to ring agent %s", session.id, agent.name)
            _drop_leg(leg)
            return False
        agent.state = "busy"
        agent.session_id = session.id
        agent.queue = w.qc.name
        offer.leg = leg
        w.offer = offer
        uri, destination, transport = target
        from_uri = session.from_uri.split(";tag=")[0]
        call = OutgoingCall(engine.sip, uri, from_uri=from_uri, sdp=_offer_sdp(engine, ctl.caller, leg),
                            destination=destination, transport=transport, owner=offer,
                            headers=[("x-baton-queue", w.qc.name)])
        offer.call = call
        leg.call = call
        offer.timer = engine.loop.call_later(w.qc.ring_timeout, self._ring_timeout, offer)
        log.info("session %s: queue %s rings agent %s", session.id, w.qc.name, agent.name)
        engine.loop.create_task(call.start())
        return True

    def _close_offer(self, offer: Offer, cancel: bool) -> None:
        offer.done = True
        if offer.timer is not None:
            offer.timer.cancel()
            offer.timer = None
        if cancel and offer.call is not None:
            offer.call.cancel()
        leg = offer.leg
        if leg is not None and not leg.answered:
            _drop_leg(leg)
        if offer.waiting.offer is offer:
            offer.waiting.offer = None

    def _agent_free(self, agent: Agent, unreachable: bool = False) -> None:
        agent.session_id = ""
        if unreachable:
            agent.unreachable_until = time.monotonic() + UNREACHABLE_RETRY
            agent.state = "offline"
        else:
            agent.state = "available"   # idle_since unchanged: not answering is not a call

    def _ring_timeout(self, offer: Offer) -> None:
        if offer.done:
            return
        log.info("session %s: agent %s did not answer", offer.waiting.ctl.session.id,
                 offer.agent.name)
        self._close_offer(offer, cancel=True)
        offer.waiting.tried.add(offer.agent.name)
        self._agent_free(offer.agent)
        self.dispatch()

    def offer_failed(self, offer: Offer, status: int) -> None:
        if offer.done:
            return
        log.info("session %s: agent %s answered %d", offer.waiting.ctl.session.id,
                 offer.agent.name, status)
        self._close_offer(offer, cancel=False)
        offer.waiting.tried.add(offer.agent.name)
        self._agent_free(offer.agent, unreachable=status in UNREACHABLE)
        self.dispatch()

    def withdraw(self, w: Waiting) -> None:
        """The caller no longer waits: stop ringing their agent."""
        offer = w.offer
        if offer is not None and not offer.done:
            self._close_offer(offer, cancel=True)
            self._agent_free(offer.agent)

    def agent_answered(self, offer: Offer, msg) -> None:
        from engine.modules.bridge import hand_over

        w, agent, leg, call = offer.waiting, offer.agent, offer.leg, offer.call
        ctl = w.ctl
        session = ctl.session
        if offer.done or not ctl.active or session.ended or w.member is None:
            offer.done = True
            call.hangup()
            if leg is not None:
                _drop_leg(leg)
            if agent.session_id == session.id:
                self._agent_free(agent)
            self.dispatch()
            return
        offer.done = True
        if offer.timer is not None:
            offer.timer.cancel()
        leg.attach_dialog(call.dialog)
        leg.answered = True
        try:
            neg, _ = sdp.negotiate(sdp.parse(msg.body))
        except SdpError as exc:
            log.info("session %s: agent %s's SDP is unusable: %s", session.id, agent.name, exc)
            w.offer = None
            w.tried.add(agent.name)
            leg.hangup("sdp")
            self._agent_free(agent)
            self.dispatch()
            return
        leg.apply_media(neg)
        w.offer = None
        q = self.queues.get(w.qc.account, w.qc.name)
        session.params["queue_wait"] = round(w.member.waited, 3)
        self.queues.serve(w.member)
        w.member = None
        agent.calls += 1
        started = time.monotonic()
        leg.on_release = lambda: self._agent_call_ended(agent, w.qc, started)
        session.params["queue"] = w.qc.name
        session.params["agent"] = agent.name
        log.info("session %s: agent %s answered after %.1f s in queue %s (%d waiting)",
                 session.id, agent.name, session.params.get("queue_wait", 0), w.qc.name,
                 len(q) if q is not None else 0)
        hand_over(session, leg)
        ctl.transfer(_bridge_node(ctl.node), reason="agent-answered")
        self.dispatch()

    def _agent_call_ended(self, agent: Agent, qc: QueueConfig, started: float) -> None:
        c = self.counters.get(qc.name)
        if c is not None:
            c.handled += 1
            c.handle_total += time.monotonic() - started + qc.wrap_up
        agent.session_id = ""
        agent.state = "wrap-up"
        if qc.wrap_up > 0:
            agent.wrap_timer = self.engine.loop.call_later(qc.wrap_up, self._end_wrap_up, agent)
        else:
            self._end_wrap_up(agent)

    def _end_wrap_up(self, agent: Agent) -> None:
        if agent.wrap_timer is not None:
            agent.wrap_timer.cancel()
            agent.wrap_timer = None
        if agent.state != "wrap-up":
            return
        agent.state = "available"
        agent.idle_since = time.monotonic()
        self.refresh()
        self.dispatch()

    # -- statistics -----------------------------------------------------------------------
    def agents_online(self, qc: QueueConfig) -> int:
        return sum(1 for n in qc.agents if self.agents[n].state != "offline")

    def estimated_wait(self, qc: QueueConfig, position: int) -> float:
        """Seconds: the position times the average handling time, shared by
        the agents signed in."""
        c = self.counters[qc.name]
        aht = c.handle_total / c.handled if c.handled else qc.handle_time
        return position * aht / max(1, self.agents_online(qc))

    def queue_stats(self, name: str) -> dict:
        qc = self.cfg.queues[name]
        q = self.queues.get(qc.account, name, create=True)
        c = self.counters[name]
        by_state = {s: 0 for s in AGENT_STATES}
        for n in qc.agents:
            by_state[self.agents[n].state] += 1
        callers = []
        for pos, m in enumerate(q.members.values(), 1):
            w = self.waiting.get(m.session_id)
            callers.append({"session_id": m.session_id, "position": pos, "waited": m.waited,
                            "agent": w.offer.agent.name if w is not None and w.offer else "",
                            "announcement": w.announcement if w is not None else ""})
        return {"name": name, "account": qc.account, "waiting": len(q),
                "longest_wait": q.longest_wait, "served": q.served, "abandoned": q.abandoned,
                "timed_out": c.timed_out, "full": c.full, "average_wait": q.average_wait,
                "average_handle": c.handle_total / c.handled if c.handled else 0.0,
                "max_size": q.max_size, "agents": by_state, "callers": callers}

    def agent_info(self, a: Agent) -> dict:
        queues = [n for n, qc in self.cfg.queues.items() if a.name in qc.agents]
        idle = time.monotonic() - a.idle_since if a.state == "available" else 0.0
        return {"name": a.name, "state": a.state, "user": a.cfg.user,
                "contact": a.cfg.uri or a.contact, "queues": queues, "idle": idle,
                "calls": a.calls, "session_id": a.session_id, "signed_out": a.signed_out}


def _drop_leg(leg) -> None:
    """An agent leg that never became part of the call: its ports back, and
    off the session's legs (a caller who waits long rings many agents)."""
    leg.ended = True
    leg.release()
    legs = leg.session.legs
    if leg in legs:
        legs.remove(leg)


def _offer_sdp(engine, caller, leg) -> bytes:
    """Offer the agent what the caller uses, so the bridge never transcodes."""
    neg = caller.negotiated
    leg.sdp_version += 1
    if neg is None:
        return sdp.build(engine.media_address, leg.ports.port, None, leg.sdp_id, leg.sdp_version)
    offer = sdp.Negotiated()
    offer.payload_type, offer.codec, offer.dtmf_pt = neg.payload_type, neg.codec, neg.dtmf_pt
    offer.direction = "sendrecv"
    return sdp.build(engine.media_address, leg.ports.port, offer, leg.sdp_id, leg.sdp_version)


def _bridge_node(node):
    """The node the answered call continues in: `baton.bridge` with this
    node's post-call wiring (`done`, `dialled-hangup`)."""
    from engine.sessions.apps import Node

    outlets = {k: v for k, v in node.outlets.items() if k in ("done", "fallback")}
    return Node(name=node.name, module="baton.bridge", params={}, outlets=outlets,
                events=dict(node.events), app=node.app)


class CallCenterModule(Module):
    code = "baton.call_center"
    level = "service"
    outlets = ("done", "timeout", "full", "no-agents", "0-9 * #")

    @classmethod
    def check_params(cls, params: dict) -> None:
        for k in params:
            if k not in NODE_KEYS:
                raise ValueError(f"{k}: unknown param (known: {', '.join(NODE_KEYS)})")
        q = params.get("queue")
        if not isinstance(q, str) or not q:
            raise ValueError("queue: the name of a [call_center.queues.NAME] is required")
        if "timeout" in params:
            _number("timeout", params["timeout"], 1, 86400)

    def take(self, ctl) -> None:
        center = CallCenter.of(self.engine)
        session = ctl.session
        qc = center.cfg.queues.get(str(ctl.params.get("queue", "")))
        if qc is None or qc.account != session.account:
            log.warning("session %s: no call-centre queue %r for account %s", session.id,
                        ctl.params.get("queue"), session.account)
            ctl.release("failed")
            return
        if not answer_caller(ctl):
            return
        if "no-agents" in ctl.node.outlets and center.agents_online(qc) == 0:
            ctl.release("no-agents")
            return
        try:
            member = center.queues.enqueue(qc.account, qc.name, session.id, max_size=qc.max_size)
        except QueueFull:
            center.counters[qc.name].full += 1
            ctl.release("full")
            return
        w = Waiting(ctl, qc, member)
        ctl.state = w
        center.waiting[session.id] = w
        center.watch()
        session.params["queue"] = qc.name
        ctl.later(float(ctl.params.get("timeout", qc.timeout)), self._timeout, ctl)
        if qc.text_agents_after:
            ctl.later(qc.text_agents_after, self._text_agents, ctl)
        w.task = self.engine.loop.create_task(self._announce(ctl, first=True))
        center.dispatch()

    def _text_agents(self, ctl) -> None:
        """The caller is still waiting after `text_agents_after`: text each of the
        queue's agents (a user where it registered, an agent's `uri` as the
        account's outbound rules allow), metered as this module's `message_out`."""
        w = ctl.state
        center = CallCenter.of(self.engine)
        qc = w.qc
        cfg = self.engine.cfg
        waiting = sum(1 for x in center.waiting.values() if x.qc is qc)
        body = (f"A caller has waited {int(qc.text_agents_after)} s in queue {qc.name} "
                f"({waiting} waiting).")
        for name in qc.agents:
            a = center.cfg.agents[name]
            to = a.uri or f"sip:{a.user}@{cfg.advertise or cfg.sip_host}"
            self.engine.messaging.notify(qc.account, to, body, module=self.code)

    # -- what the caller hears --------------------------------------------------------
    async def _announce(self, ctl, first: bool = False) -> None:
        w = ctl.state
        qc = w.qc
        center = CallCenter.of(self.engine)
        texts = []
        if first and qc.greeting:
            texts.append(qc.greeting)
        if qc.announce_position and w.member is not None:
            q = center.queues.get(qc.account, qc.name)
            pos = q.position(w.member) if q is not None else 0
            if pos:
                w.announcement = qc.position_prompt.format(
                    position=pos, wait=spoken_wait(center.estimated_wait(qc, pos)), queue=qc.name)
                texts.append(w.announcement)
        pcm = None
        if texts:
            pcm = await render_or_none(ctl, "queue announcement", " ".join(texts), voice=qc.voice)
        if not ctl.active or w.member is None:
            return
        if pcm is not None:
            w.announcing = True
            w.player = start_player(ctl, pcm)
            if w.player is not None:
                return
        await self._music(ctl)

    async def _music(self, ctl) -> None:
        w = ctl.state
        w.announcing = False
        qc = w.qc
        center = CallCenter.of(self.engine)
        music = center.music.get(qc.name)
        if music is None:
            if qc.hold_music == "tones":
                music = hold_tones()
            else:
                from engine.media.wav import load_wav

                try:
                    music = await load_wav(qc.hold_music)
                except Exception as exc:
                    log.warning("queue %s: hold music %s: %s; playing tones", qc.name,
                                qc.hold_music, exc)
                    music = hold_tones()
            center.music[qc.name] = music
        if not ctl.active or w.member is None:
            return
        w.player = start_player(ctl, music, 0)
        if qc.announce_every > 0 and qc.announce_position:
            w.next_announcement = ctl.later(qc.announce_every, self._again, ctl)

    def _again(self, ctl) -> None:
        w = ctl.state
        if w is not None and w.member is not None:
            w.task = self.engine.loop.create_task(self._announce(ctl))

    def media_event(self, ctl, leg, kind, detail) -> None:
        w = ctl.state
        if w is None or leg is not ctl.caller:
            return
        if kind == "play-done" and w.announcing and w.member is not None:
            w.announcing = False
            w.task = self.engine.loop.create_task(self._music(ctl))
        elif kind == "dtmf" and detail in ctl.node.outlets and w.member is not None:
            self._leave(ctl, w)
            ctl.release(detail, Digits=detail)

    # -- leaving the queue ---------------------------------------------------------------
    def _leave(self, ctl, w: Waiting) -> None:
        center = CallCenter.of(self.engine)
        center.withdraw(w)
        if w.member is not None:
            center.queues.leave(w.member)
            w.member = None
        center.waiting.pop(ctl.session.id, None)

    def _timeout(self, ctl) -> None:
        w = ctl.state
        if w is None or w.member is None:
            return
        CallCenter.of(self.engine).counters[w.qc.name].timed_out += 1
        self._leave(ctl, w)
        ctl.release("timeout")

    def revoke(self, ctl, reason: str) -> None:
        from engine.modules.bridge import ADOPT_KEY

        w = ctl.state
        if w is None:
            return
        center = CallCenter.of(self.engine)
        session = ctl.session
        if w.member is not None:
            q = center.queues.get(w.qc.account, w.qc.name)
            if session.ended and session.end_reason != "shutdown" and q is not None:
                q.abandoned += 1
        self._leave(ctl, w)
        if w.task is not None and not w.task.done():
            w.task.cancel()
        ch = ctl.caller.channel
        if ch is not None and w.player is not None and ch.player is w.player:
            ch.silence()
        # An answered agent leg that no bridge took (the hand-off was refused).
        leg = session.saved.pop(ADOPT_KEY, None)
        if leg is not None:
            leg.hangup("not-bridged")
        center.dispatch()


__all__ = ["CallCenterModule", "CallCenter", "load_config", "check_routes", "CenterConfig",
           "QueueConfig", "AgentConfig", "AGENT_STATES"]
