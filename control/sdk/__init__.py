"""The Python SDK for Baton module vendors.

A vendor module is a separate process that attaches to the engine's
ModuleHost service, receives offers of sessions routed to its module code,
takes them, and drives them with awaitable commands::

    from control.sdk import Say, VendorClient

    client = VendorClient("127.0.0.1:50051", "acme.survey", "the-vendor-secret")

    @client.on_offer
    async def survey(offer):
        call = await offer.take()
        answer = await call.gather(num_digits=1, prompt=Say("Rate us from 1 to 5"))
        await call.release("done", {"rating": answer.digits})

    asyncio.run(client.run())

See docs/vendors.md for the protocol, the lifecycle and billing.
"""
from control.sdk.client import Call, Offer, VendorClient
from control.sdk.errors import (ControlError, ControlLost, Disconnected, FailedPrecondition, Internal,
                     InvalidArgument, NotFound, PermissionDenied, RegistrationError,
                     Unauthenticated, Unimplemented)
from control.sdk.types import (Ack, ControlRevoked, CostWarning, Dtmf, Event, GatherResult, LegAnswered,
                    LegEnded, MessageStatus, Money, OfferInfo, Play, PlaybackFinished, Prompt,
                    RecordingReady, Say, TextReceived)

__all__ = [
    "VendorClient", "Offer", "Call", "OfferInfo",
    "Ack", "Say", "Play", "Prompt", "Event", "Dtmf", "GatherResult", "PlaybackFinished",
    "RecordingReady", "LegAnswered", "LegEnded", "ControlRevoked", "CostWarning", "Money",
    "TextReceived", "MessageStatus",
    "ControlError", "ControlLost", "Disconnected", "InvalidArgument", "NotFound",
    "PermissionDenied", "FailedPrecondition", "Unimplemented", "Unauthenticated", "Internal",
    "RegistrationError",
]
