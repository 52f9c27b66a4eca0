"""Service-level modules: packaged business logic (phone tree, call centre,
verification codes, calling card, survey), configured per app node in TOML.

Each service module's class is listed in SERVICE_MODULES; the engine registers
them next to the basic and application modules (engine/modules/catalog.py).
"""
from __future__ import annotations

from engine.modules.services.call_center import CallCenterModule
from engine.modules.services.calling_card import CallingCardModule
from engine.modules.services.phone_tree import PhoneTreeModule
from engine.modules.services.survey import SurveyModule
from engine.modules.services.verify import VerifyModule

SERVICE_MODULES: tuple = (CallCenterModule, CallingCardModule, PhoneTreeModule, SurveyModule, VerifyModule,)
