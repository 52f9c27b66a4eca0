"""The layout rules of docs/architecture.md ("Where things live"), read from the source.

Every import in engine/, ext/, control/ and proto/ is collected with `ast`
(module-level and function-level alike; `.pyx` files by their `import` and
`cimport` lines), and the graph of modules must keep these rules:

- no cycle between modules (an edge is an import naming the module; the
  package `__init__` that Python runs on the way is not an edge of its own,
  which is why the `__init__` files hold docstrings and re-exports only);
- `ext/` imports nothing outside `ext/`;
- `engine/` never imports `control/`, but for the composition roots
  `engine.runtime` (which starts the gRPC servers) and `engine.cli`;
- `engine.sessions` never imports `engine.modules`: sessions sit below the
  modules and reach them through the dispatcher and the `Module` calls;
- what `engine.accounting.accountant` imports, and what that imports, reaches
  nothing of `engine.sip` or `engine.media`.

A failure names the import with its file and line.
"""
from __future__ import annotations

import ast
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("engine", "ext", "control", "proto")
ACCOUNTANT = "engine.accounting.accountant"
NOT_IN_ACCOUNTANT = ("engine.sip", "engine.media")
COMPOSITION_ROOTS = ("engine.runtime", "engine.cli")
_PYX_IMPORT = re.compile(r"^\s*(?:from\s+([\w.]+)\s+c?import\s+([\w, ()]+)|c?import\s+([\w.]+))",
                         re.M)


def _module_files() -> dict[str, str]:
    """Module name -> path, for every .py and .pyx under the packages (generated code aside)."""
    out = {}
    for pkg in PACKAGES:
        for d, dirs, files in os.walk(os.path.join(ROOT, pkg)):
            dirs[:] = [x for x in dirs if x not in ("_gen", "__pycache__", "includes")]
            for f in files:
                if not f.endswith((".py", ".pyx")):
                    continue
                rel = os.path.relpath(os.path.join(d, f), ROOT)
                name = os.path.splitext(rel)[0].replace(os.sep, ".")
                if name.endswith(".__init__"):
                    name = name[: -len(".__init__")]
                out[name] = rel
    return out


MODULES = _module_files()


def _resolve(name: str) -> str | None:
    """The project module an imported name refers to (the longest prefix that is one)."""
    parts = name.split(".")
    while parts:
        cand = ".".join(parts)
        if cand in MODULES:
            return cand
        parts.pop()
    return None


def _imports(module: str, path: str) -> list[tuple[str, int]]:
    """(imported project module, line) for every import in the file."""
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        src = f.read()
    is_pkg = path.endswith("__init__.py")
    package = module if is_pkg else module.rpartition(".")[0]
    names: list[tuple[str, int]] = []
    if path.endswith(".pyx"):
        for m in _PYX_IMPORT.finditer(src):
            line = src.count("\n", 0, m.start()) + 1
            if m.group(3):
                names.append((m.group(3), line))
            else:
                for leaf in re.split(r"[,\s()]+", m.group(2)):
                    if leaf and leaf != "as":
                        names.append((f"{m.group(1)}.{leaf}", line))
                names.append((m.group(1), line))
    else:
        for node in ast.walk(ast.parse(src, path)):
            if isinstance(node, ast.Import):
                names += [(a.name, node.lineno) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(up + ([base] if base else []))
                # `from a import b` imports a.b when b is a module, else a.
                names += [(f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base,
                           node.lineno) for a in node.names]
    out = []
    for name, line in names:
        target = _resolve(name)
        if target is not None and target != module:
            out.append((target, line))
    return out


GRAPH: dict[str, dict[str, int]] = {}
for _mod, _path in MODULES.items():
    GRAPH[_mod] = {}
    for _target, _line in _imports(_mod, _path):
        GRAPH[_mod].setdefault(_target, _line)


def _where(src: str, dst: str) -> str:
    return f"{MODULES[src]}:{GRAPH[src][dst]}: {src} imports {dst}"


def _in(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _cycles() -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    return found


def _one_cycle(comp: list[str]) -> list[str]:
    """A shortest cycle through the component's first module, as file:line edges."""
    members = set(comp)
    start = comp[0]
    prev = {start: None}
    queue = [start]
    while queue:
        v = queue.pop(0)
        for w in sorted(GRAPH[v]):
            if w == start:
                path = [v]
                while prev[path[-1]] is not None:
                    path.append(prev[path[-1]])
                path.reverse()
                path.append(start)
                return [_where(a, b) for a, b in zip(path, path[1:])]
            if w in members and w not in prev:
                prev[w] = v
                queue.append(w)
    return comp


def test_the_walk_sees_the_tree():
    # Guard against a walk that silently finds nothing to check.
    assert {"engine.sessions.session", "ext.kernels", "proto.pb", "control.vendor.offers",
            ACCOUNTANT} <= set(MODULES)
    assert "ext.kernels" in GRAPH["engine.sip.transport"]
    assert "engine.accounting.ledger" in GRAPH[ACCOUNTANT]


def test_no_import_cycles():
    cycles = [_one_cycle(c) for c in _cycles()]
    assert not cycles, "import cycles:\n" + "\n\n".join("\n".join(c) for c in cycles)


def test_ext_is_a_leaf():
    bad = [_where(m, t) for m in GRAPH if _in(m, "ext") for t in GRAPH[m] if not _in(t, "ext")]
    assert not bad, "ext/ imports outside ext/:\n" + "\n".join(bad)


def test_engine_never_imports_control():
    bad = [_where(m, t) for m in GRAPH if _in(m, "engine") for t in GRAPH[m] if _in(t, "control")
           and not any(_in(m, root) for root in COMPOSITION_ROOTS)]
    assert not bad, "engine/ imports control/:\n" + "\n".join(bad)


def test_sessions_never_import_modules():
    bad = [_where(m, t) for m in GRAPH if _in(m, "engine.sessions") for t in GRAPH[m]
           if _in(t, "engine.modules")]
    assert not bad, "engine/sessions imports engine/modules:\n" + "\n".join(bad)


def test_the_accountant_imports_nothing_of_sip_or_media():
    seen = {ACCOUNTANT: None}
    queue = [ACCOUNTANT]
    bad = []
    while queue:
        v = queue.pop(0)
        for w in sorted(GRAPH[v]):
            if w in seen:
                continue
            seen[w] = v
            if any(_in(w, p) for p in NOT_IN_ACCOUNTANT):
                chain = [w]
                while seen[chain[-1]] is not None:
                    chain.append(seen[chain[-1]])
                chain.reverse()
                bad.append("\n".join(_where(a, b) for a, b in zip(chain, chain[1:])))
                continue
            queue.append(w)
    assert not bad, "the accountant reaches SIP or media:\n\n" + "\n\n".join(bad)


@pytest.mark.parametrize("name", ["sip", "ring", "g711", "dtmf", "mix"])
def test_no_extensions_selects_every_twin(name, monkeypatch):
    """BATON_NO_EXTENSIONS=1 reaches every kernel that has a twin, the mixer included."""
    import importlib

    import ext.kernels

    monkeypatch.setenv("BATON_NO_EXTENSIONS", "1")
    chosen = ext.kernels._CHOOSERS[name]()  # chooses afresh, leaving the cached choice alone
    assert chosen.IMPLEMENTATION == "py"
    twin = importlib.import_module(f"ext.{name}_py")
    public = [k for k in vars(chosen) if k != "IMPLEMENTATION"]
    assert public and all(getattr(chosen, k) is getattr(twin, k) for k in public)
