"""Who may import whom (docs/architecture.md, "Layers"), read from every module's imports with `ast`:
top-level, function-level and TYPE_CHECKING imports alike, so the layering cannot rot quietly."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SERVE = Path(__file__).resolve().parents[2] / "serve"
HTTP = ("flask", "werkzeug", "serve.app", "serve.handlers", "serve.protocol", "serve.validation")

RULES = [  # (modules, what they must never import, why)
    ("serve.engine", HTTP, "the engine never sees HTTP, JSON schemas or API errors"),
    ("serve.model_loading", HTTP, "loading a model knows nothing of the HTTP layer"),
    ("serve.service", HTTP, "the model service (load, readiness, drain) knows nothing of the HTTP layer"),
    ("serve.watchdog", HTTP, "the watchdog restarts a worker whose engine died; it knows nothing of HTTP"),
    ("serve.structured", ("flask", "werkzeug", "serve.app", "serve.handlers", "serve.validation"),
     "structured output raises its own error; deciding it is a 422 belongs to the layers above"),
    ("serve.chat_template", HTTP, "rendering a template decides no HTTP status"),
    ("serve.protocol", ("flask", "werkzeug", "serve.app", "serve.handlers", "serve.validation", "serve.engine",
                        "serve.service", "torch"), "the wire schemas are plain pydantic"),
    ("serve.validation", ("flask", "werkzeug", "serve.app", "serve.handlers"), "the boundary sits below the handlers"),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(SERVE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(source: str, module: str, is_package: bool = False) -> set[str]:
    """Every module `source` imports anywhere; `from a import b` counts as `a` and `a.b`."""
    names: set[str] = set()
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against this module's package
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def violations(modules: str, forbidden: tuple[str, ...]) -> list[str]:
    found = []
    for path in sorted(SERVE.rglob("*.py")):
        name = module_name(path)
        if name != modules and not name.startswith(modules + "."):
            continue
        for target in imported(path.read_text(encoding="utf-8"), name, path.name == "__init__.py"):
            if any(target == f or target.startswith(f + ".") for f in forbidden):
                found.append(f"{name} imports {target}")
    return found


@pytest.mark.parametrize("modules, forbidden, why", RULES, ids=[r[0] for r in RULES])
def test_layering(modules, forbidden, why):
    assert not violations(modules, forbidden), why


def test_every_rule_names_existing_modules():
    names = {module_name(p) for p in SERVE.rglob("*.py")}
    for modules, _, _ in RULES:
        assert any(n == modules or n.startswith(modules + ".") for n in names), modules


@pytest.mark.parametrize("source, module, hit", [
    ("def f():\n    import flask\n", "serve.engine.engine", "flask"),
    ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from serve.protocol import errors\n",
     "serve.engine.engine", "serve.protocol.errors"),
    ("from ..handlers import common\n", "serve.engine.engine", "serve.handlers.common"),
    ("from .. import validation\n", "serve.engine.engine", "serve.validation"),
    ("from . import batch\n", "serve.engine.engine", "serve.engine.batch"),
])
def test_the_check_sees_every_kind_of_import(source, module, hit):
    assert hit in imported(source, module)
