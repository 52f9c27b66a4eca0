"""The docs stay true: the generated config reference is current, every relative link
resolves, `baton config check` / `reference` work, and the billing worked examples are
what the accountant really computes."""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from engine.config import doc as config_doc
from ext.kernels import ring
from engine.accounting.accountant import Accountant
from engine.accounting.invoices import invoice, payouts
from tests.helpers import BATON

ROOT = Path(__file__).resolve().parent.parent
GUIDE = ROOT / "docs" / "operators-guide.md"
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def baton(*args):
    return subprocess.run([BATON, *args], capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)


def test_generated_config_reference_is_current():
    generated = config_doc.generated_part(GUIDE.read_text())
    assert generated, f"{GUIDE} lost its {config_doc.BEGIN} / {config_doc.END} markers"
    assert generated == config_doc.reference(), (
        "docs/operators-guide.md's config reference is stale: run "
        "`.venv/bin/baton config reference --update docs/operators-guide.md`")


def test_schema_describes_every_accepted_key():
    problems = config_doc.consistency_problems()
    assert problems == [], ("describe these in engine/config/load.py TABLES/SCHEMA (or "
                            "engine/config/doc.py BILLING_TYPES): " + "; ".join(problems))


def test_reference_covers_the_sections():
    text = config_doc.reference()
    for section in ("engine", "media", "registrar", "users.NAME", "accounts.ID",
                    "accounts.ID.numbers.NUMBER", "accounts.ID.billing", "apps.NAME",
                    "apps.NAME.nodes.NODE", "modules.CODE", "trunks.NAME", "policy",
                    "vendors.ID", "plans.NAME", "billing"):
        assert f"### `[{section}]`" in text
    assert "| `level_plans` | table |" in text and "| `baton.bridge` | basic |" in text


def markdown_files() -> list[Path]:
    return sorted((ROOT / "docs").rglob("*.md")) + [ROOT / "README.md"]


def test_relative_links_resolve():
    broken = []
    for md in markdown_files():
        text = FENCE.sub("", md.read_text())
        for target in LINK.findall(text):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                continue                 # http(s), mailto: and in-page anchors
            path = target.split("#", 1)[0]
            if not (md.parent / path).exists():
                broken.append(f"{md.relative_to(ROOT)}: {target}")
    assert broken == []


def test_link_check_finds_a_broken_link(tmp_path):
    text = "see [the guide](missing.md) and [ok](https://example.com)\n```\n[x](nope.md)\n```"
    found = LINK.findall(FENCE.sub("", text))
    assert found == ["missing.md", "https://example.com"]


def test_readme_links_the_operators_guide():
    assert "docs/operators-guide.md" in (ROOT / "README.md").read_text()


def test_config_check_command(tmp_path):
    r = baton("config", "check", str(ROOT / "examples" / "demo.toml"))
    assert r.returncode == 0 and ": ok (" in r.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text('[trunks.pstn]\nproxy = "127.0.0.1:5090"\nprefx = "00"\n')
    r = baton("config", "check", str(bad))
    assert r.returncode == 2
    assert r.stderr.strip() == (f"{bad}: trunks.pstn.prefx: unknown key (known: domain, "
                                "message_max, message_split, password, prefix, proxy, "
                                "transport, trusted, username)")
    bad.write_text('[plans.x]\nprice = "0.01"\n[billing]\nperiod = "year"\n')
    r = baton("config", "check", str(bad))
    assert r.returncode == 2 and r.stderr.startswith(f"{bad}: billing.period: ")
    r = baton("config", "check", str(tmp_path / "none.toml"))
    assert r.returncode == 2 and "file not found" in r.stderr


def test_config_reference_command(tmp_path):
    r = baton("config", "reference")
    assert r.returncode == 0 and r.stdout == config_doc.reference()
    doc = tmp_path / "guide.md"
    doc.write_text(f"# Guide\n\n{config_doc.BEGIN}\nold\n{config_doc.END}\n\nafter\n")
    assert baton("config", "reference", "--update", str(doc)).returncode == 0
    assert config_doc.generated_part(doc.read_text()) == config_doc.reference()
    assert doc.read_text().endswith(f"{config_doc.END}\n\nafter\n")
    doc.write_text("no markers\n")
    r = baton("config", "reference", "--update", str(doc))
    assert r.returncode == 2 and "markers" in r.stderr


# --------------------------------------------------------------------------- billing.md

S = 1_000_000_000
WALL0 = 1_793_491_200 * S          # 2026-11-01T00:00:00Z
MONO0 = 5_000 * S
SEED = {
    "plans": {"bridge-basic": {"price": "0.001", "unit": "minute"},
              "app-std": {"price": "0.01", "unit": "minute"}},
    "billing": {"level_plans": {"basic": "bridge-basic", "application": "app-std"}},
    "vendors": {"acme": {"name": "Acme Surveys Ltd", "revenue_share": 0.7,
                         "modules": ["acme.survey"]}},
}


def worked_example(data: Path, config: dict) -> tuple[dict, dict]:
    """The call of docs/billing.md's worked examples, through the ring and the accountant."""
    w = ring.RingWriter(os.path.join(data, "ring", "ring.dat"), slots=1024, node_id="n1")
    w.stamp_session("start", "S1", "demo", MONO0, WALL0)
    spans = [("", "baton.instructions", "application", 0),
             ("baton.instructions", "baton.bridge", "basic", 130),
             ("baton.bridge", "acme.survey", "application", 375)]
    for frm, to, level, t in spans:
        w.stamp_transition("S1", "demo", frm, to, level, "r", MONO0 + t * S, WALL0 + t * S)
    w.stamp_session("end", "S1", "demo", MONO0 + 465 * S, WALL0 + 465 * S, "hangup")
    w.close()
    with Accountant(str(data), config) as acct:
        acct.drain()
        return invoice(acct.ledger, "demo", "2026-11"), payouts(acct.ledger, "2026-11")


def amounts(inv: dict) -> dict[str, str]:
    return {line["module"]: line["amount"] for line in inv["lines"]}


def test_billing_worked_examples_are_what_the_accountant_computes(tmp_path):
    doc = (ROOT / "docs" / "billing.md").read_text()
    section = doc[doc.index("## Worked examples"):]
    inv, pay = worked_example(tmp_path / "a", SEED)
    assert amounts(inv) == {"baton.instructions": "0.021667", "baton.bridge": "0.004083",
                            "acme.survey": "0.015"}
    assert inv["total"] == "0.04075"
    for value in ("0.021667", "0.004083", "0.015", "TOTAL       0.04075"):
        assert value in section
    (statement,) = pay["statements"]
    assert statement["vendor"] == "acme"
    text = repr(statement)
    assert "0.0105" in text and "0.0045" in text and "0.015" in text
    assert "acme.survey  time     1         1  0.015          0.0045  0.0105" in section

    stepped = {**SEED, "plans": {
        "bridge-basic": {**SEED["plans"]["bridge-basic"], "increment": "60/60"},
        "app-std": {**SEED["plans"]["app-std"], "increment": "6/6"}}}
    inv, _ = worked_example(tmp_path / "b", stepped)
    assert amounts(inv) == {"baton.instructions": "0.022", "baton.bridge": "0.005",
                            "acme.survey": "0.015"}
    assert inv["total"] == "0.042"
    for value in ("**0.005**", "**0.022**", "**0.042**"):
        assert value in section


def test_vendor_guide_documents_the_sdk_clients_state_and_methods():
    """What a vendor needs from `VendorClient` beyond its constructor (how to know it
    has registered, its process id, the calls it holds...) is in docs/vendors.md."""
    import inspect

    from control.sdk import VendorClient

    client = VendorClient("127.0.0.1:1", "acme.survey", "s" * 16)
    ctor = set(inspect.signature(VendorClient).parameters)
    public = [n for n in dir(client) if not n.startswith("_") and n not in ctor]
    guide = (ROOT / "docs" / "vendors.md").read_text()
    assert "registered" in public
    assert [n for n in public if f"client.{n}" not in guide] == []


def test_vendor_config_keys_are_gathered_in_the_vendor_guide():
    """Every config key a vendor module depends on is in one section of docs/vendors.md,
    and the other documents link there instead of repeating the keys."""
    guide = (ROOT / "docs" / "vendors.md").read_text()
    assert "\n## 1. Configuration keys\n" in guide     # anchor #1-configuration-keys
    section = guide.split("\n## 1. Configuration keys\n")[1].split("\n## ")[0]
    sections = config_doc.sections()
    wanted = {"vendors.ID": set(sections["vendors.ID"][1]),
              "modules.CODE": set(sections["modules.CODE"][1]) - {"uri", "alias"},
              "apps.NAME.nodes.NODE": {"module", "params", "outlets", "events"},
              "accounts.ID.numbers.NUMBER": {"module"},
              "engine": {"grpc", "grpc_addr", "grpc_tls_cert", "grpc_tls_key",
                         "grpc_tls_client_ca", "operator_tokens"},
              "billing": {"default_revenue_share", "listings"},
              "policy": {"allow_modules", "deny_modules", "limits"}}
    missing = []
    for name, keys in wanted.items():
        assert keys <= set(sections[name][1]), (name, keys - set(sections[name][1]))
        missing += [f"{name}.{k}" for k in sorted(keys) if f"`{k}`" not in section]
    assert missing == []
    for doc in ("configuration.md", "billing.md"):
        text = (ROOT / "docs" / doc).read_text()
        assert "vendors.md#1-configuration-keys" in text, doc
        assert "offer_timeout" not in text and "[vendors.acme.plans]" not in text, doc
