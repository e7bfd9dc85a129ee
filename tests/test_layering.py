"""The dependency rule of docs/architecture.md, checked over every import in src/ (lazy ones included).

A layer may import itself and the layers listed for it; anything else fails with the file and
the import that breaks the rule.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "deepseek_serve"

ALLOWED: dict[str, set[str]] = {
    "contracts": set(),
    "config": set(),
    "models": {"config", "contracts"},
    "engine": {"config", "contracts", "models"},
    "storage": {"config", "contracts"},
    "cache": {"config", "contracts"},
    "observability": {"config", "contracts", "engine"},  # reads EngineStats, never drives the engine
    "bench": {"config", "contracts"},  # the load generator talks HTTP only
    # the request path between the routes and the engine; no web framework, never the HTTP layer
    "serving": {"config", "contracts", "engine", "observability"},
    "api": {"config", "contracts", "models", "engine", "storage", "cache", "observability", "serving", "gateway"},
    "gateway": {"config", "contracts", "models", "engine", "observability", "serving"},
    "cli": {
        "config",
        "contracts",
        "models",
        "engine",
        "storage",
        "cache",
        "observability",
        "serving",
        "api",
        "gateway",
        "bench",
    },
    "__main__": {"cli"},
    "__init__": set(),
}


def _layer(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every module `path` imports: top-level, lazy and TYPE_CHECKING imports, `from deepseek_serve
    import x` as `deepseek_serve.x`, and `importlib.import_module` calls with a literal name."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            found.append((node.lineno, "<relative>"))
        elif isinstance(node, ast.ImportFrom) and node.module == "deepseek_serve":
            found.extend((node.lineno, f"deepseek_serve.{alias.name}") for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.Call) and _is_import_module(node.func) and node.args:
            name = _literal_prefix(node.args[0])
            if name is not None:
                found.append((node.lineno, name))
    return found


def _is_import_module(func: ast.expr) -> bool:
    return (isinstance(func, ast.Attribute) and func.attr == "import_module") or (
        isinstance(func, ast.Name) and func.id in ("import_module", "__import__")
    )


def _literal_prefix(arg: ast.expr) -> str | None:
    """The module name of a literal argument; for an f-string, its literal start (`"a.b.{x}"` -> `a.b`)."""
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return arg.value
    if isinstance(arg, ast.JoinedStr) and arg.values:
        first = arg.values[0]
        if isinstance(first, ast.Constant) and isinstance(first.value, str):
            return first.value.rstrip(".") or None
    return None


def test_every_layer_is_known() -> None:
    layers = {_layer(p) for p in PACKAGE.rglob("*.py")}
    assert layers <= set(ALLOWED), f"new layer(s) {sorted(layers - set(ALLOWED))}: give them a rule here"


def test_imports_point_down() -> None:
    broken = []
    for path in sorted(PACKAGE.rglob("*.py")):
        layer = _layer(path)
        for line, module in _imports(path):
            if module == "<relative>":
                broken.append(f"{path.relative_to(PACKAGE)}:{line}: relative import (use absolute imports)")
                continue
            parts = module.split(".")
            if parts[0] != "deepseek_serve" or len(parts) < 2:
                continue
            target = parts[1]
            if target != layer and target not in ALLOWED[layer]:
                broken.append(f"{path.relative_to(PACKAGE)}:{line}: {layer} imports {module}")
    assert not broken, "imports against the dependency rule:\n" + "\n".join(broken)


def test_the_rule_catches_an_upward_import(tmp_path: Path) -> None:
    """The checker itself: every form of import is seen."""
    module = tmp_path / "m.py"
    module.write_text(
        "import importlib\n"
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from deepseek_serve.storage.keys import KeyInfo\n"
        "def f():\n"
        "    from deepseek_serve.api.deps import PrincipalDep\n"
        "    from deepseek_serve import gateway\n"
        "    importlib.import_module('deepseek_serve.observability.metrics')\n"
        "    importlib.import_module(f'deepseek_serve.cli.{name}')\n"
    )
    found = _imports(module)
    for expected in [
        (4, "deepseek_serve.storage.keys"),
        (6, "deepseek_serve.api.deps"),
        (7, "deepseek_serve.gateway"),
        (8, "deepseek_serve.observability.metrics"),
        (9, "deepseek_serve.cli"),
    ]:
        assert expected in found
    assert "api" not in ALLOWED["cache"] and "api" not in ALLOWED["storage"] and "api" not in ALLOWED["engine"]
    assert "api" not in ALLOWED["serving"]


def test_layers_are_ordered() -> None:
    """The layer map has no cycle, so "higher" and "lower" mean something."""
    done: set[str] = set()

    def visit(layer: str, path: tuple[str, ...]) -> None:
        assert layer not in path, "cycle in ALLOWED: " + " -> ".join((*path, layer))
        if layer not in done:
            for target in ALLOWED[layer]:
                visit(target, (*path, layer))
            done.add(layer)

    for layer in ALLOWED:
        visit(layer, ())


def test_serving_is_free_of_the_web_framework() -> None:
    """The request path takes plain values (a plan, an ASGI `receive`) and returns an `Answer`; only the
    HTTP layer (api/) knows FastAPI and Starlette."""
    found = [
        f"{path.relative_to(PACKAGE)}:{line}: {module}"
        for path in sorted((PACKAGE / "serving").rglob("*.py"))
        for line, module in _imports(path)
        if module.split(".")[0] in ("fastapi", "starlette")
    ]
    assert not found, "serving imports the web framework:\n" + "\n".join(found)
