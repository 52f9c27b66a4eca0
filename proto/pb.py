"""The generated protobuf and gRPC code of `proto/baton/v1`, generated on first use.

`make build` runs protoc into `proto/_gen/` (never committed). When that
is missing or older than the .proto files (a fresh checkout, an edited
proto), this module runs grpc_tools' protoc itself, under a file lock so
concurrent processes (a test starting vendor processes) generate it once.
"""
from __future__ import annotations

import fcntl
import glob
import os
import shutil
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROTO_DIR = os.path.join(ROOT, "proto")
GEN_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_gen")
_OUT = ("common_pb2.py", "module_host_pb2.py", "module_host_pb2_grpc.py", "sessions_pb2.py",
        "sessions_pb2_grpc.py", "billing_pb2.py", "billing_pb2_grpc.py",
        "call_center_pb2.py", "call_center_pb2_grpc.py", "services_pb2.py",
        "services_pb2_grpc.py", "messages_pb2.py", "messages_pb2_grpc.py")


def _protos() -> list[str]:
    return sorted(glob.glob(os.path.join(PROTO_DIR, "baton", "v1", "*.proto")))


def _fresh() -> bool:
    out = os.path.join(GEN_DIR, "baton", "v1")
    try:
        gen_mtime = min(os.stat(os.path.join(out, f)).st_mtime for f in _OUT)
    except OSError:
        return False
    protos = _protos()
    if not protos:
        return True  # an installed copy without the sources: use what is there
    return gen_mtime >= max(os.stat(p).st_mtime for p in protos)


def generate(force: bool = False) -> None:
    """Run protoc on proto/baton/v1/*.proto into proto/_gen (if stale or forced)."""
    if not force and _fresh():
        return
    os.makedirs(GEN_DIR, exist_ok=True)
    with open(os.path.join(GEN_DIR, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not force and _fresh():
            return
        from grpc_tools import protoc

        import grpc_tools

        include = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
        # Generate beside, then swap in: a reader never sees half a package.
        tmp = tempfile.mkdtemp(prefix=".gen-", dir=GEN_DIR)
        try:
            rc = protoc.main(["grpc_tools.protoc", f"-I{PROTO_DIR}", f"-I{include}",
                              f"--python_out={tmp}", f"--grpc_python_out={tmp}",
                              f"--pyi_out={tmp}", *_protos()])
            if rc != 0:
                raise RuntimeError(f"protoc failed ({rc}) on {PROTO_DIR}/baton/v1/*.proto")
            dest = os.path.join(GEN_DIR, "baton")
            old = dest + f".old-{os.getpid()}"
            if os.path.exists(dest):
                os.rename(dest, old)
            os.rename(os.path.join(tmp, "baton"), dest)
            shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


generate()
if GEN_DIR not in sys.path:
    # protoc's output imports itself as `baton.v1.*`.
    sys.path.insert(0, GEN_DIR)

from baton.v1 import common_pb2, module_host_pb2, module_host_pb2_grpc  # noqa: E402
from baton.v1 import sessions_pb2, sessions_pb2_grpc  # noqa: E402
from baton.v1 import billing_pb2, billing_pb2_grpc  # noqa: E402
from baton.v1 import call_center_pb2, call_center_pb2_grpc  # noqa: E402
from baton.v1 import services_pb2, services_pb2_grpc  # noqa: E402
from baton.v1 import messages_pb2, messages_pb2_grpc  # noqa: E402

SERVICE_MODULE_HOST = "baton.v1.ModuleHost"
SERVICE_SESSIONS = "baton.v1.Sessions"
SERVICE_BILLING = "baton.v1.Billing"
SERVICE_CALL_CENTER = "baton.v1.CallCenter"
SERVICE_SURVEY = "baton.v1.Survey"
SERVICE_VERIFY = "baton.v1.Verify"
SERVICE_MESSAGES = "baton.v1.Messages"

__all__ = ["common_pb2", "module_host_pb2", "module_host_pb2_grpc", "sessions_pb2",
           "sessions_pb2_grpc", "billing_pb2", "billing_pb2_grpc", "generate",
           "SERVICE_MODULE_HOST", "SERVICE_SESSIONS", "SERVICE_BILLING"]
__all__ += ["call_center_pb2", "call_center_pb2_grpc", "SERVICE_CALL_CENTER"]
__all__ += ["services_pb2", "services_pb2_grpc", "SERVICE_SURVEY", "SERVICE_VERIFY"]
__all__ += ["messages_pb2", "messages_pb2_grpc", "SERVICE_MESSAGES"]


# -- google.protobuf.Struct <-> Python ------------------------------------------------
from collections.abc import Mapping  # noqa: E402
from typing import Any  # noqa: E402

from google.protobuf import struct_pb2  # noqa: E402


def to_value(v: Any) -> struct_pb2.Value:
    """A Python value as a protobuf Value (anything unknown as its str())."""
    out = struct_pb2.Value()
    if v is None:
        out.null_value = struct_pb2.NULL_VALUE
    elif isinstance(v, bool):
        out.bool_value = v
    elif isinstance(v, (int, float)):
        out.number_value = float(v)
    elif isinstance(v, str):
        out.string_value = v
    elif isinstance(v, Mapping):
        out.struct_value.CopyFrom(to_struct(v))
    elif isinstance(v, (list, tuple)):
        out.list_value.values.extend(to_value(x) for x in v)
    else:
        out.string_value = str(v)
    return out


def to_struct(d: Mapping | None) -> struct_pb2.Struct:
    """A dict as a protobuf Struct (keys as strings)."""
    s = struct_pb2.Struct()
    if d:
        for k, v in d.items():
            s.fields[str(k)].CopyFrom(to_value(v))
    return s


def from_value(v: struct_pb2.Value) -> Any:
    """A protobuf Value as Python; whole numbers come back as int."""
    kind = v.WhichOneof("kind")
    if kind == "number_value":
        n = v.number_value
        return int(n) if n.is_integer() and abs(n) < 2 ** 53 else n
    if kind == "string_value":
        return v.string_value
    if kind == "bool_value":
        return v.bool_value
    if kind == "struct_value":
        return from_struct(v.struct_value)
    if kind == "list_value":
        return [from_value(x) for x in v.list_value.values]
    return None


def from_struct(s: struct_pb2.Struct | None) -> dict:
    """A protobuf Struct as a dict."""
    if s is None:
        return {}
    return {k: from_value(v) for k, v in s.fields.items()}


__all__ += ["to_struct", "to_value", "from_struct", "from_value"]
