"""`baton config`: check a config file; print the config reference.

The reference is generated from the schema the loader validates against:
engine.config.load.SCHEMA (sections of plain keys), engine.config.load.TABLES (sections of named
entries), the billing keys of engine.accounting.config and the plan keys of
engine.accounting.plans, and the call-center keys of the service that reads them.
docs/operators-guide.md carries it between two markers; `baton config reference
--update docs/operators-guide.md` rewrites that part and tests/test_docs.py fails when it
is stale.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

BEGIN = "<!-- BEGIN GENERATED: baton config reference -->"
END = "<!-- END GENERATED: baton config reference -->"

_TYPE_NAMES = {str: "string", int: "integer", float: "number", bool: "bool", list: "list",
               dict: "table"}

# Types of the [billing] keys (their meanings are engine.accounting.config._BILLING_KEYS).
BILLING_TYPES = {
    "default_plan": "string",
    "level_plans": "table",
    "action_plans": "table",
    "listings": "table",
    "currency": "string",
    "period": "string",
    "default_revenue_share": "number or string",
    "store": "string",
    "batch_records": "integer",
    "batch_ms": "number",
    "commit_ms": "number",
    "policy_interval": "number",
    "pipeline": "bool",
}

CALL_CENTER_AGENT_KEYS = {
    "user": ("string", "a [users.NAME] that registers with the engine's registrar"),
    "uri": ("string", "a fixed SIP URI the agent is rung at"),
}

# The order sections appear in; anything else the schema gains follows.
ORDER = ("engine", "media", "sip", "overload", "registrar", "users.NAME", "accounts.ID",
         "accounts.ID.numbers.NUMBER", "accounts.ID.billing", "accounts.ID.outbound",
         "apps.NAME", "apps.NAME.nodes.NODE", "modules.CODE", "trunks.NAME", "policy",
         "policy.accounts.ID", "vendors.ID", "vendors.ID.outbound", "plans.NAME", "billing",
         "api_keys.ID", "webhooks",
         "call_center.agents.NAME", "call_center.queues.NAME")


def _type_name(typ) -> str:
    if isinstance(typ, tuple):
        return "number" if set(typ) <= {int, float} else " or ".join(_type_name(t) for t in typ)
    return _TYPE_NAMES.get(typ, getattr(typ, "__name__", str(typ)))


def sections() -> dict[str, tuple[str, dict[str, tuple[str, str]]]]:
    """Every section of the config: name -> (what it is, {key: (type, meaning)})."""
    from engine.accounting.config import _BILLING_KEYS
    from engine.config.load import SCHEMA, TABLES

    out: dict[str, tuple[str, dict[str, tuple[str, str]]]] = {}
    summaries = {"engine": "the engine process: addresses, data, logs, the control API",
                 "media": "RTP: the address, the port range, inactivity timeouts",
                 "sip": "SIP transport limits (docs/security.md) and UDP buffers",
                 "overload": "overload control: when new INVITEs and texts get 503 + Retry-After "
                             "(docs/operators-guide.md)",
                 "registrar": "SIP REGISTER handling and its limits (docs/security.md)",
                 "webhooks": "signed HTTP notifications of billing events (docs/billing.md)"}
    for name, keys in SCHEMA.items():
        out[name] = (summaries.get(name, ""),
                     {k: (_type_name(t), desc) for k, (t, desc) in keys.items()})
    for name, (summary, keys) in TABLES.items():
        out[name] = (summary, dict(keys))
    out["billing"] = ("platform-wide billing: default plans, period, ledger store "
                      "(docs/billing.md)",
                      {k: (BILLING_TYPES.get(k, "?"), desc) for k, desc in _BILLING_KEYS.items()})
    try:
        from engine.modules.services.call_center import QUEUE_KEYS
    except ImportError:
        QUEUE_KEYS = None
    if QUEUE_KEYS is not None:
        out["call_center.agents.NAME"] = ("a call-center agent; exactly one key",
                                          dict(CALL_CENTER_AGENT_KEYS))
        out["call_center.queues.NAME"] = ("a call-center queue (module baton.call_center)",
                                          {k: ("", d) for k, d in QUEUE_KEYS.items()})
    ordered = {n: out[n] for n in ORDER if n in out}
    ordered.update({n: v for n, v in out.items() if n not in ordered})
    return ordered


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _builtin_modules() -> list[tuple[str, str, str]]:
    from engine.modules.catalog import builtin_modules

    rows = []
    for code, cls in sorted(builtin_modules().items()):
        # A module file's docstring opens with "`CODE`: what it does."
        doc = sys.modules[cls.__module__].__doc__ or cls.__doc__ or ""
        doc = " ".join(doc.strip().split("\n\n")[0].split())
        doc = doc.removeprefix(f"`{code}`: ")
        rows.append((code, getattr(cls, "level", ""), doc[:1].upper() + doc[1:]))
    return rows


def reference() -> str:
    """The config reference as Markdown (what `baton config reference` prints)."""
    lines = ["Generated by `baton config reference` from the schema the loader checks "
             "against; do not edit by hand. Every section and key is optional unless it says "
             "required; an unknown section or key is an error.", ""]
    for name, (summary, keys) in sections().items():
        lines.append(f"### `[{name}]`")
        lines.append("")
        if summary:
            lines.append(summary[0].upper() + summary[1:] + ".")
            lines.append("")
        lines.append("| key | type | meaning |")
        lines.append("|---|---|---|")
        for key, (typ, desc) in keys.items():
            lines.append(f"| `{key}` | {_cell(typ) or '—'} | {_cell(desc)} |")
        lines.append("")
    lines.append("### Built-in modules")
    lines.append("")
    lines.append("| code | level | what it does |")
    lines.append("|---|---|---|")
    for code, level, doc in _builtin_modules():
        lines.append(f"| `{code}` | {level} | {_cell(doc)} |")
    return "\n".join(lines).rstrip() + "\n"


def splice(document: str, generated: str) -> str:
    """DOCUMENT with the part between the markers replaced by GENERATED."""
    start, end = document.find(BEGIN), document.find(END)
    if start < 0 or end < start:
        raise ValueError(f"the markers {BEGIN!r} and {END!r} are missing")
    return document[:start + len(BEGIN)] + "\n" + generated + document[end:]


def generated_part(document: str) -> str:
    start, end = document.find(BEGIN), document.find(END)
    if start < 0 or end < start:
        return ""
    return document[start + len(BEGIN):end].lstrip("\n")


def consistency_problems() -> list[str]:
    """Keys a validator accepts that the schema does not describe, or the other way round."""
    from engine.accounting import config as billing
    from engine.accounting import plans
    from engine.config.load import SCHEMA, TABLES, ConfigError, from_dict

    problems = []

    def compare(what: str, described, accepted) -> None:
        described, accepted = set(described), set(accepted)
        for k in sorted(accepted - described):
            problems.append(f"{what}.{k} is accepted but not described")
        for k in sorted(described - accepted):
            problems.append(f"{what}.{k} is described but not accepted")

    compare("accounts.ID.billing", TABLES["accounts.ID.billing"][1], billing._ACCOUNT_KEYS)
    compare("vendors.ID", TABLES["vendors.ID"][1], billing._VENDOR_KEYS)
    compare("plans.NAME", TABLES["plans.NAME"][1], set().union(*plans._ALLOWED.values()))
    compare("billing", BILLING_TYPES, billing._BILLING_KEYS)
    if "api_keys.ID" in TABLES:
        from engine.config import api_keys

        compare("api_keys.ID", TABLES["api_keys.ID"][1], api_keys._KEYS)
    try:
        from_dict({"no-such-section": {}})
    except ConfigError as exc:
        known = exc.problem.partition("(known: ")[2].rstrip(")").split(", ")
        covered = {name.split(".")[0] for name in sections()}
        for name in sorted(set(known) - covered):
            problems.append(f"[{name}] is accepted but not described")
    for name in SCHEMA:
        for key, (_typ, desc) in SCHEMA[name].items():
            if not desc:
                problems.append(f"{name}.{key} has no description")
    return problems


def check(path: str) -> tuple[bool, str]:
    """Load PATH as `baton serve` and the accountant would; (ok, message)."""
    import tomllib

    from engine.accounting.config import BillingConfig, BillingConfigError
    from engine.config.load import ConfigError, load

    try:
        cfg = load(path)
    except ConfigError as exc:
        return False, str(exc)
    except OSError as exc:
        return False, f"{path}: -: {exc.strerror or exc}"
    with open(path, "rb") as f:
        raw = tomllib.load(f)
    try:
        BillingConfig.from_dict(raw)
    except BillingConfigError as exc:
        return False, f"{path}: {exc}"
    return True, (f"{path}: ok ({len(cfg.accounts)} accounts, {len(cfg.numbers)} numbers, "
                  f"{len(cfg.apps)} apps, {len(cfg.trunks)} trunks, "
                  f"{len(raw.get('plans', {}))} plans, {len(raw.get('vendors', {}))} vendors)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="baton config",
                                description="Check a config file or print the config reference.")
    sub = p.add_subparsers(dest="what", metavar="WHAT", required=True)
    c = sub.add_parser("check", help="validate a config as `baton serve` and the accountant "
                                     "would; errors are printed as FILE: KEY: PROBLEM",
                       description="Validate a config file: exit 0 and a one-line summary, or "
                                   "exit 2 and FILE: KEY: PROBLEM.")
    c.add_argument("file", metavar="FILE")
    r = sub.add_parser("reference", help="print every section and key as Markdown",
                       description="Print the config reference (Markdown), generated from the "
                                   "schema.")
    r.add_argument("--update", metavar="DOC",
                   help="rewrite the generated part of DOC (between its markers) instead")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.what == "check":
        ok, message = check(args.file)
        print(message, file=sys.stdout if ok else sys.stderr)
        return 0 if ok else 2
    text = reference()
    if args.update:
        doc = Path(args.update)
        try:
            doc.write_text(splice(doc.read_text(), text))
        except (OSError, ValueError) as exc:
            print(f"baton config: {args.update}: {exc}", file=sys.stderr)
            return 2
        print(f"{args.update}: config reference updated", file=sys.stderr)
        return 0
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
