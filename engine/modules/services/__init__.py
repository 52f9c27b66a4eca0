"""Service-level modules: packaged business logic (phone tree, call centre,
verification codes, calling card, survey), configured per app node in TOML.

Each service module's class is listed in SERVICE_MODULES; the engine registers
them next to the basic and application modules (engine/modules/catalog.py).
"""
from __future__ import annotations

from .call_center import CallCenterModule
from .calling_card import CallingCardModule
from .phone_tree import PhoneTreeModule
from .survey import SurveyModule
from .verify import VerifyModule

SERVICE_MODULES: tuple = (CallCenterModule, CallingCardModule, PhoneTreeModule, SurveyModule, VerifyModule,)
