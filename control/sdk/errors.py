"""Typed errors of the vendor SDK: one class per gRPC status a command can fail with."""
from __future__ import annotations

import grpc


class ControlError(Exception):
    """A command, take or decline the engine refused.

    `code` is the gRPC status, `message` the engine's reason and `field` the
    offending field (for INVALID_ARGUMENT), e.g. "gather.num_digits".
    """

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str, field: str = "", command_id: str = "",
                 session_id: str = ""):
        super().__init__(message)
        self.message = message
        self.field = field
        self.command_id = command_id
        self.session_id = session_id


class InvalidArgument(ControlError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(ControlError):
    code = grpc.StatusCode.NOT_FOUND


class PermissionDenied(ControlError):
    code = grpc.StatusCode.PERMISSION_DENIED


class FailedPrecondition(ControlError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Unimplemented(ControlError):
    code = grpc.StatusCode.UNIMPLEMENTED


class Unauthenticated(ControlError):
    code = grpc.StatusCode.UNAUTHENTICATED


class Internal(ControlError):
    code = grpc.StatusCode.INTERNAL


class ControlLost(FailedPrecondition):
    """This process no longer controls the session (released, transferred, revoked,
    the call ended, or the stream to the engine was lost)."""


class Disconnected(ControlLost):
    """The stream to the engine broke before the engine answered."""


class RegistrationError(Exception):
    """The engine refused this process's Register (bad secret, a code that is not
    the vendor's, a malformed request): reconnecting would not help."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


_BY_CODE: dict[int, type[ControlError]] = {
    cls.code.value[0]: cls for cls in (InvalidArgument, NotFound, PermissionDenied,
                                       FailedPrecondition, Unimplemented, Unauthenticated,
                                       Internal)}


def error_for(code: int, message: str, field: str = "", command_id: str = "",
              session_id: str = "") -> ControlError:
    """The typed error for an Ack's status code."""
    cls = _BY_CODE.get(code, ControlError)
    return cls(message, field, command_id, session_id)
