"""Check raycache's house limits by reading its source with ``ast``.

The limits (issue 19) keep the package readable by a newcomer:

- no module over ``MODULE_LINES`` lines, no class over ``CLASS_LINES``, no function over
  ``FUNCTION_LINES`` (a class or function counts from its ``def``/``class`` line, decorators
  excluded, to its last line, docstring included);
- no import cycle among raycache modules, counting every import a module makes, those
  inside functions too (a deferred import hides a cycle from Python, not from a reader),
  except those under ``if TYPE_CHECKING:``, which never run;
- nothing reaches into another module's private attributes: ``obj._name`` where ``_name`` is
  defined by some other raycache module and not by the module doing the access, and
  ``from raycache.x import _name``. ``self._x`` and ``cls._x`` always count as inside.
  Tests are checked for this too: a test goes through the public API or a documented
  test hook.

Each finding has a stable ``key`` (no line numbers, no sizes), so an allow-list of known
offenders can be kept and shrunk. Run ``python scripts/house_check.py`` for a readable list,
``--json`` for the findings as JSON; the exit status is 1 when anything is found that is not
in ``--allow`` (a file with one key per line, ``#`` comments allowed).
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = [
    "CLASS_LINES",
    "FUNCTION_LINES",
    "MODULE_LINES",
    "Finding",
    "check",
    "main",
]

MODULE_LINES = 450
CLASS_LINES = 300
FUNCTION_LINES = 60

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Finding:
    """One thing over a limit.

    Parameters
    ----------
    kind : str
        ``"module"``, ``"class"``, ``"function"``, ``"cycle"`` or ``"private"``.
    key : str
        Stable name of the offender, for allow-lists.
    detail : str
        What was measured, for people (sizes, line numbers).
    """

    kind: str
    key: str
    detail: str


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _span(node: ast.AST) -> int:
    return node.end_lineno - node.lineno + 1  # type: ignore[attr-defined]


def _sizes(tree: ast.Module, module: str, rel: str, text: str) -> Iterator[Finding]:
    lines = len(text.splitlines())
    if lines > MODULE_LINES:
        yield Finding("module", f"module {rel}", f"{lines} lines > {MODULE_LINES}")

    def walk(node: ast.AST, prefix: str) -> Iterator[Finding]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                name, limit, kind = f"{prefix}{child.name}", CLASS_LINES, "class"
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name, limit, kind = f"{prefix}{child.name}", FUNCTION_LINES, "function"
            else:
                yield from walk(child, prefix)
                continue
            if _span(child) > limit:
                yield Finding(
                    kind,
                    f"{kind} {module}.{name}",
                    f"{rel}:{child.lineno} {_span(child)} lines > {limit}",
                )
            yield from walk(child, f"{name}.")

    yield from walk(tree, "")


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _running_nodes(body: list[ast.stmt]) -> Iterator[ast.stmt]:
    """Yield every statement, nested ones included, except those under TYPE_CHECKING."""
    for node in body:
        if isinstance(node, ast.If) and _is_type_checking(node):
            yield from _running_nodes(node.orelse)
            continue
        yield node
        for field in ("body", "orelse", "finalbody", "handlers"):
            yield from _running_nodes(getattr(node, field, []) or [])


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    base = base[: len(base) - node.level + (1 if is_package else 0)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(
    tree: ast.Module, module: str, is_package: bool, modules: set[str]
) -> Iterator[tuple[str, str]]:
    """Yield ``(imported raycache module, name)`` for each import that can run."""
    for node in _running_nodes(tree.body):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in modules:
                    yield alias.name, ""
        elif isinstance(node, ast.ImportFrom):
            target = _absolute(node, module, is_package)
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if sub in modules:
                    yield sub, ""
                elif target in modules:
                    yield target, alias.name


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Return the strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _defined_private(tree: ast.Module) -> set[str]:
    """Return the private names a module defines: functions, classes, attributes, globals.

    Imported names are not definitions: importing another module's private name is a
    finding of its own.
    """
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            for stmt in node.body:
                if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                    names.add(stmt.target.id)
                if isinstance(stmt, ast.Assign) and isinstance(stmt.value, ast.Tuple):
                    slots = [t for t in stmt.targets if getattr(t, "id", "") == "__slots__"]
                    for elt in stmt.value.elts if slots else ():
                        if isinstance(elt, ast.Constant) and isinstance(elt.value, str):
                            names.add(elt.value)
    return {n for n in names if _private(n)}


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _private_access(
    tree: ast.Module, rel: str, own: set[str], everyone: dict[str, set[str]]
) -> Iterator[Finding]:
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("raycache"):
            for alias in node.names:
                if _private(alias.name):
                    key = f"private {rel} imports {node.module}.{alias.name}"
                    yield Finding("private", key, f"{rel}:{node.lineno}")
        if not isinstance(node, ast.Attribute) or not _private(node.attr):
            continue
        if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
            continue
        if node.attr in own:
            continue
        owners = sorted(m for m, names in everyone.items() if node.attr in names)
        if owners:
            key = f"private {rel} reaches {node.attr} of {'/'.join(owners)}"
            yield Finding("private", key, f"{rel}:{node.lineno}")


def _parse_tree(root: Path, folder: str) -> dict[str, tuple[Path, ast.Module, str]]:
    out = {}
    for path in sorted((root / folder).rglob("*.py")):
        text = path.read_text()
        out[_module_name(path, root)] = (path, ast.parse(text, str(path)), text)
    return out


def check(root: Path = ROOT) -> list[Finding]:
    """Return every finding for the package under ``root/raycache`` and its tests.

    Parameters
    ----------
    root : Path, optional
        The repository root (default: the one this script lives in).

    Returns
    -------
    list of Finding
        Sorted by key; each key appears once.
    """
    package = _parse_tree(root, "raycache")
    found: dict[str, Finding] = {}
    modules = set(package)
    graph: dict[str, set[str]] = {}
    private = {m: _defined_private(tree) for m, (_, tree, _) in package.items()}
    for module, (path, tree, text) in package.items():
        rel = str(path.relative_to(root))
        for finding in _sizes(tree, module, rel, text):
            found.setdefault(finding.key, finding)
        is_package = path.name == "__init__.py"
        edges = graph.setdefault(module, set())
        for target, _name in _imports(tree, module, is_package, modules):
            if target != module:
                edges.add(target)
        others = {m: names for m, names in private.items() if m != module}
        for finding in _private_access(tree, rel, private[module], others):
            found.setdefault(finding.key, finding)
    for component in _cycles(graph):
        key = "cycle " + " <-> ".join(component)
        found.setdefault(key, Finding("cycle", key, "modules that import each other"))
    tests = root / "tests"
    for path in sorted(tests.glob("*.py")) if tests.is_dir() else ():
        tree = ast.parse(path.read_text(), str(path))
        rel = str(path.relative_to(root))
        for finding in _private_access(tree, rel, _defined_private(tree), private):
            found.setdefault(finding.key, finding)
    return [found[k] for k in sorted(found)]


def _read_allow(path: str | None) -> set[str]:
    if not path:
        return set()
    lines = Path(path).read_text().splitlines()
    return {line.split("#", 1)[0].strip() for line in lines} - {""}


def main(argv: list[str] | None = None) -> int:
    """Print the findings; return 1 if any is not allowed.

    Parameters
    ----------
    argv : list of str, optional
        Command-line arguments (default: ``sys.argv[1:]``).

    Returns
    -------
    int
        0 when every finding is in the allow-list, 1 otherwise.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=str(ROOT), help="repository root")
    parser.add_argument("--allow", help="file of allowed finding keys, one per line")
    parser.add_argument("--json", action="store_true", help="print the findings as JSON")
    args = parser.parse_args(argv)
    findings = check(Path(args.root))
    allowed = _read_allow(args.allow)
    new = [f for f in findings if f.key not in allowed]
    if args.json:
        print(json.dumps([asdict(f) for f in findings], indent=1))
    else:
        for f in findings:
            mark = "allowed" if f.key in allowed else "NEW"
            print(f"{mark:8} {f.key}  [{f.detail}]")
        print(f"{len(findings)} findings, {len(new)} not allowed")
    return 1 if new else 0


if __name__ == "__main__":
    sys.exit(main())
