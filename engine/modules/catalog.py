"""Every built-in module class by code: the engine registers them, the config
loader checks app nodes' params against them at start."""
from __future__ import annotations

import functools


@functools.cache
def builtin_modules() -> dict[str, type]:
    from .bridge import BridgeModule
    from .echo import EchoModule
    from .hold import HoldModule
    from .instructions import InstructionsModule
    from .menu import MenuModule, PlayModule
    from .record import RecordModule
    from .services import SERVICE_MODULES

    classes = (HoldModule, EchoModule, BridgeModule, MenuModule, PlayModule, RecordModule,
               InstructionsModule, *SERVICE_MODULES)
    return {m.code: m for m in classes}


def builtin_codes() -> tuple[str, ...]:
    return tuple(builtin_modules())
