"""The prepaid warning: a session's limit is near, so tell the listeners, let the
module handle it, else speak the configured text to the caller over whatever
the module does with the media (a bridge, a silent or echoing channel, a prompt).
"""
from __future__ import annotations

import asyncio

from engine.media.commands.prompt import render_or_none
from engine.sessions.policy import Decision
from ext.kernels import rtp


def warn(ctl, decision: Decision) -> None:
    """The limit is `decision.warn_before` seconds away (or less): tell the
    listeners (Watch: `limit-warning`), let the module handle it (a module's
    `limit_warning(ctl, seconds_left)` returning True), else speak the
    configured warning to the caller."""
    if not ctl.active:
        return
    session = ctl.session
    engine = session.engine
    left = min(decision.warn_before, decision.limit or 0.0)
    if engine.listeners:
        engine.notify(session, "limit-warning", {"module": ctl.module.code,
                                                 "seconds_left": round(left, 3),
                                                 "limit": decision.limit})
    hook = getattr(ctl.module, "limit_warning", None)
    if hook is not None and hook(ctl, left):
        return
    if decision.warning and engine.speech is not None:
        engine.loop.create_task(speak_over(ctl, decision.warning, decision.voice))


async def speak_over(ctl, text: str, voice: str = "en") -> bool:
    """Speak `text` to the caller whatever the module does with the media:
    in a bridge (the caller's RTP relayed), the far end's audio to the caller
    is paused while the caller hears the text, then the relay resumes (the
    caller is heard by the far end all along); on a silent or echoing
    channel it plays at once; while a module's own prompt plays, it waits
    for the prompt to end. True when it was played."""
    pcm = await render_or_none(ctl, "limit warning", text, None, voice)
    if pcm is None:
        return False
    caller = ctl.caller
    while ctl.active and caller.stream is not None:
        seconds = len(pcm) / 8000
        if caller.stream.mode == rtp.MODE_RELAY:
            far = [leg for leg in ctl.session.legs if leg is not caller and leg.stream is not None
                   and leg.stream.mode == rtp.MODE_RELAY]
            for leg in far:
                leg.stream.idle()
            ch = caller.open_channel()
            if ch is None:
                return False
            player = rtp.Player(pcm, 1)
            ch.play(player)
            ctl.later(seconds + 0.1, _resume_relay, ctl, caller, far, player)
            return True
        ch = caller.open_channel()
        if ch is None:
            return False
        if ch.source in (rtp.SOURCE_SILENCE, rtp.SOURCE_ECHO):
            echo = ch.source == rtp.SOURCE_ECHO
            player = rtp.Player(pcm, 1)
            ch.play(player)
            if echo:
                ctl.later(seconds + 0.05, _resume_echo, ch, player)
            return True
        await asyncio.sleep(0.5)
    return False


def _resume_relay(ctl, caller, far, player) -> None:
    ch = caller.channel
    if caller.stream is None or ch is None or ch.player not in (player, None):
        return
    if ch.source not in (rtp.SOURCE_SILENCE, rtp.SOURCE_PLAYER):   # ours, or done
        return
    caller.close_channel()
    for leg in far:
        if leg.stream is not None and leg.stream.mode == rtp.MODE_IDLE and not leg.ended:
            leg.stream.relay_to(caller.stream)


def _resume_echo(ch, player) -> None:
    if ch.player is player or (ch.player is None and ch.source == rtp.SOURCE_SILENCE):
        ch.echo()
