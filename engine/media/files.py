"""Where recordings are kept and which files a play may read.

Recordings live in `DATA/recordings/ACCOUNT/` under 128-bit random names
(`RE<32 hex>.wav`), so one account cannot name, let alone play, another's.
A play of a local file is confined to a list of directories; a path outside
them and a path that does not exist give the same answer (`None` from
`confine`), so a caller cannot probe what exists on the machine.
"""
from __future__ import annotations

import hashlib
import os
import re
import secrets

__all__ = ["recording_path", "recordings_dir", "account_roots", "confine", "find_recording",
           "NO_SUCH_FILE"]

NO_SUCH_FILE = "no such audio file"
_SAFE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def _dir_name(account: str) -> str:
    # Account ids come from the operator's config; anything odd still maps to one
    # directory name that cannot climb out of recordings/.
    if _SAFE.fullmatch(account) and account not in (".", ".."):
        return account
    return "_" + hashlib.sha256(account.encode()).hexdigest()[:32]


def recordings_dir(data_dir: str, account: str) -> str:
    """The account's own recordings directory (created 0700 on first use)."""
    d = os.path.join(data_dir, "recordings", _dir_name(account or "_"))
    os.makedirs(d, mode=0o700, exist_ok=True)
    return d


def recording_path(data_dir: str, account: str, prefix: str = "RE") -> str:
    """A new, unguessable recording file name in the account's directory."""
    return os.path.join(recordings_dir(data_dir, account), prefix + secrets.token_hex(16) + ".wav")


def account_roots(cfg, account: str) -> list[str]:
    """The directories an account's plays may read: the engine's `sounds/`, the
    operator's `[media] sounds_dirs` and the account's own recordings."""
    return [os.path.join(cfg.data_dir, "sounds"), *cfg.guard.sounds_dirs,
            os.path.join(cfg.data_dir, "recordings", _dir_name(account or "_"))]


def confine(path: str, roots) -> str | None:
    """The real path of `path` when it is a file inside one of `roots`, else None
    (missing and not allowed are one answer)."""
    real = os.path.realpath(path)
    for root in roots:
        if root and real.startswith(os.path.realpath(root) + os.sep):
            return real if os.path.isfile(real) else None
    return None


def find_recording(data_dir: str, name: str, account: str | None = None) -> str | None:
    """The file of recording `name` (`RE<32 hex>`, already checked by the caller): in
    `account`'s directory only when given, else in any account's."""
    base = os.path.join(data_dir, "recordings")
    if account is not None:
        dirs = [os.path.join(base, _dir_name(account))]
    else:
        try:
            dirs = [e.path for e in os.scandir(base) if e.is_dir(follow_symlinks=False)]
        except OSError:
            return None
    for d in dirs:
        p = os.path.join(d, name + ".wav")
        if os.path.isfile(p):
            return p
    return None
