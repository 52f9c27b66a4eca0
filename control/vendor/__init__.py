"""The engine side of vendor modules (see docs/vendors.md).

| file | what |
|---|---|
| `offers.py` | `VendorProcess` (one Attach stream), `VendorState` (per Control), `Offers`: the offer protocol, losing control, the command stream and its acks |
| `commands.py` | `VendorModule`: the per-command handlers (`_cmd_<action>`) and the media they start |
| `hub.py` | `ControlHub`: every vendor module code, conferences, resumable state, shared audio caches |
"""
from control.vendor.commands import VendorModule
from control.vendor.hub import ControlHub
from control.vendor.offers import CommandError, VendorProcess, VendorState

__all__ = ["CommandError", "ControlHub", "VendorModule", "VendorProcess", "VendorState"]
