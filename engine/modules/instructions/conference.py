"""Conference rooms on the Cython mixer (`<Dial><Conference>`, and queue connections).

A room is one `ext.mix.Conference`; a participant is a caller channel on the
media clock joined to it with `MediaClock.join`, so the mixing of every room
happens once per tick inside the clock, in C. Participants that arrive
before the room has started (no one with `startConferenceOnEnter` yet) wait
outside the mixer and are joined when it starts. A participant's `ended`
future resolves with the reason it left (`left`, `conference-ended`,
`hangup-on-star`, `time-limit`).

The rooms know nothing of TwiML; `dial_conference`, `in_room` and `hold` (a wait
document, or silence, until something happens) are the `<Dial><Conference>` verb
and what queues share with it, run for an instructions `Runner` (verbs.py).
"""
from __future__ import annotations

import asyncio
import secrets
import time
from typing import Callable
from urllib.parse import urljoin

from engine.modules.instructions.fetch import FetchError
from engine.modules.instructions.flow import STOP
from engine.modules.instructions.parser import DocumentError, Verb

__all__ = ["Rooms", "Room", "Participant", "RoomFull"]


class RoomFull(Exception):
    """The room already has maxParticipants participants."""


class Participant:
    """One channel in one room."""

    def __init__(self, room: "Room", pid: str, channel, *, muted: bool = False,
                 start_on_enter: bool = True, end_on_exit: bool = False, beep: str = "true"):
        self.room = room
        self.pid = pid
        self.channel = channel
        self.muted = muted
        self.start_on_enter = start_on_enter
        self.end_on_exit = end_on_exit
        self.beep = beep
        self.slot = -1
        self.mixing = False
        self.beep_player = None
        loop = asyncio.get_running_loop()
        self.ended: asyncio.Future = loop.create_future()
        self.started: asyncio.Future = loop.create_future()

    def _mix(self) -> None:
        clock = self.room.clock
        if self.channel is not None and self.slot >= 0:
            clock.join(self.channel, self.room.conf, self.slot)
            self.mixing = True
        if not self.started.done():
            self.started.set_result(None)

    def play_beep(self, pcm) -> None:
        """Play a beep to this participant; it hears the mix again after it (`beep_done`)."""
        from ext.kernels import rtp

        if self.channel is None or not self.mixing:
            return
        self.beep_player = rtp.Player(pcm, 1)
        # Still in the conference while the beep plays: it keeps being heard.
        self.channel.play(self.beep_player)

    def beep_done(self) -> bool:
        """The clock finished a beep on this channel: back to the mix. False if no beep ran."""
        if self.beep_player is None:
            return False
        self.beep_player = None
        if self.mixing and not self.ended.done():
            self.room.clock.join(self.channel, self.room.conf, self.slot)
        return True

    def leave(self, reason: str = "left") -> None:
        """Take this participant out of the room (idempotent)."""
        self.room.remove(self, reason)


class Room:
    """One conference: the mixer, its participants and whether it has started."""

    def __init__(self, rooms: "Rooms | None", clock, key, max_participants: int = 250,
                 on_event: Callable[[str, dict], None] | None = None):
        from ext.kernels import rtp
        Conference = rtp.Conference

        self.rooms = rooms
        self.clock = clock
        self.key = key
        self.sid = "CF" + secrets.token_hex(16)
        self.max_participants = max_participants
        self.conf = Conference(max_participants)
        self.participants: dict[str, Participant] = {}
        self.started = False
        self.ended = False
        self.on_event = on_event
        self._beep = None

    def __len__(self) -> int:
        return len(self.participants)

    def beep_pcm(self):
        if self._beep is None:
            from engine.media import signals

            self._beep = signals.beep()
        return self._beep

    def join(self, pid: str, channel, **flags) -> Participant:
        """Add a channel; it is mixed at once if the room has started (or this starts it)."""
        if self.ended:
            raise RoomFull("the conference has ended")
        if len(self.participants) >= self.max_participants:
            raise RoomFull(f"the conference is full ({self.max_participants})")
        p = Participant(self, pid, channel, **flags)
        p.slot = self.conf.add(pid, "pcm", muted=p.muted)
        self.participants[pid] = p
        if p.beep in ("true", "onEnter"):
            for other in self.participants.values():
                if other is not p:
                    other.play_beep(self.beep_pcm())
        if self.started:
            p._mix()
        elif p.start_on_enter:
            self.start()
        self._emit("join", pid)
        return p

    def start(self) -> None:
        """Start the conference: every waiting participant is mixed."""
        if self.started:
            return
        self.started = True
        for p in list(self.participants.values()):
            if not p.mixing:
                p._mix()
        self._emit("start", None)

    def remove(self, p: Participant, reason: str = "left") -> None:
        if self.participants.get(p.pid) is not p:
            return
        del self.participants[p.pid]
        ch = p.channel
        if ch is not None:
            if p.mixing:
                self.clock.leave(ch)
            if p.beep_player is not None and ch.player is p.beep_player:
                ch.silence()
        p.mixing = False
        p.beep_player = None
        try:
            self.conf.remove(p.pid)
        except KeyError:
            pass
        if not p.ended.done():
            p.ended.set_result(reason)
        if not p.started.done():
            p.started.cancel()
        self._emit("leave", p.pid)
        if p.end_on_exit and reason != "conference-ended":
            self.end()
        elif p.beep in ("true", "onExit"):
            for other in self.participants.values():
                other.play_beep(self.beep_pcm())
        if not self.participants:
            self.end()

    def end(self) -> None:
        """End the conference: every participant leaves with `conference-ended`."""
        if self.ended:
            return
        self.ended = True
        for p in list(self.participants.values()):
            self.remove(p, "conference-ended")
        if self.rooms is not None:
            self.rooms.forget(self)
        self._emit("end", None)

    def _emit(self, what: str, pid) -> None:
        if self.on_event is not None:
            self.on_event(what, {"conference": self.key[1] if isinstance(self.key, tuple)
                                 else str(self.key), "sid": self.sid, "participant": pid,
                                 "size": len(self.participants)})


class Rooms:
    """Every named conference of one engine, by (account, name)."""

    def __init__(self, clock_of: Callable[[], object]):
        self._clock_of = clock_of
        self.rooms: dict[tuple[str, str], Room] = {}

    def get(self, account: str, name: str, max_participants: int = 250,
            on_event: Callable[[str, dict], None] | None = None) -> Room:
        """The running room of that name, or a new one."""
        key = (account, name)
        room = self.rooms.get(key)
        if room is None or room.ended:
            room = self.rooms[key] = Room(self, self._clock_of(), key, max_participants,
                                          on_event)
        return room

    def private(self, max_participants: int = 2) -> Room:
        """A room nobody can join by name (a queue member connected to its agent)."""
        return Room(None, self._clock_of(), ("", "private:" + secrets.token_hex(6)),
                    max_participants)

    def forget(self, room: Room) -> None:
        if self.rooms.get(room.key) is room:
            del self.rooms[room.key]


# -- <Dial><Conference>, and staying in a room (Runner `run` of verbs.py) -------------


async def dial_conference(run, verb: Verb, noun: Verb):
    if not run.answer():
        return STOP
    ch = run.ctl.caller.channel
    room = run.shared.rooms.get(run.session.account, noun.text,
                                noun.get("maxParticipants", 250))
    try:
        part = room.join(run.session.id, ch, muted=noun.get("muted", False),
                         start_on_enter=noun.get("startConferenceOnEnter", True),
                         end_on_exit=noun.get("endConferenceOnExit", False),
                         beep=noun.get("beep", "true"))
    except (RoomFull, ValueError) as exc:
        run.error({"code": 13225, "reason": f"<Conference>{noun.text}: {exc}",
                   "line": noun.line, "verb": "Conference"})
        return run.dial_done(verb, "failed", 0, "")
    run.participant = part
    run.note("conference", {"event": "join", "name": noun.text, "sid": room.sid,
                            "size": len(room)})
    t0 = time.monotonic()
    if not room.started:
        wait = noun.get("waitUrl")
        how = await hold(run, run.resolve(wait) if wait else None,
                         noun.get("waitMethod", "POST"), part.started,
                         lambda: {"ConferenceSid": room.sid, "FriendlyName": noun.text})
        if how != "done":
            part.leave("left")
    reason = await in_room(run, verb, part)
    run.participant = None
    if not run.active:
        return STOP
    run.note("conference", {"event": "leave", "name": noun.text, "sid": room.sid,
                            "reason": reason})
    return run.dial_done(verb, "completed", int(round(time.monotonic() - t0)), room.sid)


async def in_room(run, verb: Verb, part) -> str:
    """Stay in a room until leaving it: the room ends, `*` (hangupOnStar), timeLimit."""
    run.heard = True
    deadline = run.loop.time() + verb.get("timeLimit", 14400)
    star = verb.get("hangupOnStar", False)
    run.events.clear()
    while run.active and not part.ended.done():
        left = deadline - run.loop.time()
        if left <= 0:
            part.leave("time-limit")
            break
        waiter = run.loop.create_task(run.next_event(left))
        done, _ = await asyncio.wait({waiter, part.ended},
                                     return_when=asyncio.FIRST_COMPLETED)
        if waiter not in done:
            waiter.cancel()
            break
        ev = waiter.result()
        if ev is not None and ev[0] == "dtmf" and ev[1] == "*" and star:
            part.leave("hangup-on-star")
            break
    if not part.ended.done():
        part.leave("left")
    return part.ended.result() if part.ended.done() and not part.ended.cancelled() else "left"


async def hold(run, url: str | None, method: str, until: asyncio.Future, stats) -> str:
    """Run a wait document (or silence) in a loop until `until` resolves.
    Returns "done" when `until` resolved, "leave" or "hangup" from the document."""
    task = run.loop.create_task(_wait_loop(run, url, method, stats)) if url else None
    waits = {until} if task is None else {until, task}
    try:
        done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        run.stop_player()
    if until in done:
        return "done"
    return task.result() if task is not None and not task.cancelled() else "done"


async def _wait_loop(run, url: str, method: str, stats) -> str:
    """The verbs a wait document may use: Say, Play, Pause, Redirect, Leave, Hangup."""
    while run.active:
        t0 = run.loop.time()
        try:
            doc = await run.fetch_doc(url, method, stats())
        except (FetchError, DocumentError) as exc:
            run.report(exc, url)
            await asyncio.sleep(3600)
            continue
        nxt = url
        for verb in doc.verbs:
            if not run.active:
                return "hangup"
            if verb.name in ("Say", "Play", "Pause"):
                saved, run.doc = run.doc, doc
                try:
                    await run.run_verb(verb)
                finally:
                    run.doc = saved
            elif verb.name == "Leave":
                return "leave"
            elif verb.name == "Hangup":
                run.ctl.hangup("instructions-hangup")
                return "hangup"
            elif verb.name == "Redirect":
                nxt = urljoin(url, verb.text.strip())
                method = verb.get("method", "POST")
                break
            else:
                run.error({"code": 12200, "reason": f"<{verb.name}> is not allowed in "
                                                    f"a wait document",
                           "line": verb.line, "verb": verb.name, "url": url})
        url = nxt
        if run.loop.time() - t0 < 1.0:
            # A document that plays nothing must not turn into a request flood.
            await asyncio.sleep(1.0)
    return "hangup"
