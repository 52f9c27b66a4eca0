"""Every built-in module class by code: the engine registers them, the config
loader checks app nodes' params against them at start."""
from __future__ import annotations

import functools


@functools.cache
def builtin_modules() -> dict[str, type]:
    from engine.modules.bridge import BridgeModule
    from engine.modules.echo import EchoModule
    from engine.modules.hold import HoldModule
    from engine.modules.instructions import InstructionsModule
    from engine.modules.menu import MenuModule, PlayModule
    from engine.modules.record import RecordModule
    from engine.modules.services import SERVICE_MODULES
    from engine.modules.texting import BotModule

    classes = (HoldModule, EchoModule, BridgeModule, MenuModule, PlayModule, RecordModule,
               InstructionsModule, BotModule, *SERVICE_MODULES)
    return {m.code: m for m in classes}


def builtin_codes() -> tuple[str, ...]:
    return tuple(builtin_modules())
