"""Prompts: the PCM of a spoken text (espeak-ng, cached, its characters stamped
as `tts_characters` of the module in control) or of a WAV file, and a player
for it on the caller's channel."""
from __future__ import annotations

import logging

from engine.media.files import NO_SUCH_FILE, account_roots, confine
from engine.media.wav import AudioError, load_wav
from ext.kernels import rtp

log = logging.getLogger("baton.media.prompt")


async def render(ctl, text: str | None = None, file: str | None = None, voice: str = "en",
                 language: str | None = None):
    """PCM for a prompt: spoken text (cached) or a WAV file."""
    engine = ctl.engine
    if file:
        if not ctl.node_configured:
            # A file named by a document or an API call: the account's own directories.
            file = confine(file, account_roots(engine.cfg, ctl.session.account))
            if file is None:
                raise AudioError(NO_SUCH_FILE)
        return await load_wav(file)
    kwargs = {"voice": voice, "tenant": ctl.session.account}
    if language:
        kwargs["language"] = language
    pcm = await engine.speech.say(text or "", **kwargs)
    engine.stamper.action(ctl.session, ctl.module.code, "tts_characters", len(text or ""))
    return pcm


async def render_or_none(ctl, what: str, text: str | None = None, file: str | None = None,
                         voice: str = "en", language: str | None = None):
    """`render`, or None when the prompt cannot be had (`what` failed: logged with
    the session id), so the module goes on without it."""
    try:
        return await render(ctl, text, file, voice, language)
    except AudioError as exc:
        log.warning("session %s: %s failed: %s", ctl.session.id, what, exc)
        return None


def start_player(ctl, pcm, loops: int = 1):
    """Play `pcm` on the caller's channel (opened if needed); the player, or None."""
    ch = ctl.caller.open_channel()
    if ch is None:
        return None
    player = rtp.Player(pcm, loops)
    ch.play(player)
    return player
