"""The house rules, checked on the source: who may import whom, and what commands import.

- the engine never imports a plugin (only the plugin manager loads them, by name);
- a registered plugin module never imports another one (shared code lives in the engine);
- backends never touch the store; the store never imports the CLI or the API;
- nothing imports another module's private (underscore) names;
- the CLI modules import each other without cycles, and so do the analyzers' modules;
- ``specprof --version``, ``--help`` and ``backends`` import no numerical stack.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from specprof.engine.plugins import DEFAULT_PLUGINS

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"specprof.engine": ROOT / "engine", "specprof.plugins": ROOT / "plugins",
           "specprof": ROOT / "src" / "specprof"}
HEAVY = ("torch", "onnxruntime", "hypernetx", "tensorflow", "jax", "scipy", "onnx")
"""Modules no listing command may import."""
HEAVY_FOR_VERSION = (*HEAVY, "numpy", "pandas", "sqlalchemy")


def _modules() -> dict[str, Path]:
    """Every specprof module, by dotted name."""
    found = {}
    for package, folder in FOLDERS.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            if package == "specprof" and parts[0] in ("engine", "plugins"):
                continue
            name = ".".join((package, *parts)).removesuffix(".__init__")
            found[name] = path
    return found


MODULES = _modules()


def _imports(name: str) -> list[tuple[str, list[str]]]:
    """(module imported, names taken from it) for every import in ``name``, at any depth."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            names = [alias.name for alias in node.names]
            found.append((base, names))
            # ``from specprof.plugins.analyzers import rmt`` imports a module too
            found += [(f"{base}.{n}", []) for n in names if f"{base}.{n}" in MODULES]
    return found


def _targets(name: str) -> set[str]:
    return {module for module, _ in _imports(name) if module.startswith("specprof")}


def _importing(prefix: str, forbidden: str) -> list[str]:
    return sorted(f"{name} imports {target}" for name in MODULES if name.startswith(prefix)
                  for target in _targets(name)
                  if target == forbidden or target.startswith(forbidden + "."))


def test_the_module_list_is_complete() -> None:
    assert "specprof.engine.cli" in MODULES and "specprof.plugins.backends.exact" in MODULES
    assert "specprof.testing" in MODULES


def test_the_engine_never_imports_a_plugin() -> None:
    assert _importing("specprof.engine", "specprof.plugins") == []


def test_plugins_never_import_each_other() -> None:
    registered = set(DEFAULT_PLUGINS)
    offences = sorted(f"{name} imports {target}" for name in MODULES
                      if name.startswith("specprof.plugins") for target in _targets(name)
                      if target in registered and target != name)
    assert offences == []


def test_backends_never_touch_the_store() -> None:
    assert _importing("specprof.plugins.backends", "specprof.engine.store") == []


def test_the_store_never_imports_the_cli_or_the_api() -> None:
    offences = [*_importing("specprof.engine.store", "specprof.engine.api"),
                *(line for name in ("specprof.engine.cli", "specprof.engine.cli_common",
                                    "specprof.engine.cli_store", "specprof.engine.cli_analyze")
                  for line in _importing("specprof.engine.store", name))]
    assert offences == []


def test_no_analyzer_calls_back_into_the_api() -> None:
    assert _importing("specprof.plugins.analyzers", "specprof.engine.api") == []
    assert _importing("specprof.plugins", "specprof.engine.cli") == []


def test_nothing_imports_a_private_name_across_modules() -> None:
    offences = sorted(f"{name} takes {module}.{n}" for name in MODULES
                      for module, names in _imports(name)
                      if module.startswith("specprof") and module != name
                      for n in names if n.startswith("_") and not n.startswith("__"))
    assert offences == []


def _cycles(names: list[str]) -> list[list[str]]:
    """Import cycles among ``names`` (imports at any depth count)."""
    graph = {name: _targets(name) & set(names) for name in names}
    cycles, done = [], set()

    def visit(node: str, path: list[str]) -> None:
        if node in path:
            cycles.append([*path[path.index(node):], node])
            return
        if node in done:
            return
        for target in sorted(graph[node]):
            visit(target, [*path, node])
        done.add(node)

    for name in names:
        visit(name, [])
    return cycles


def test_the_cli_modules_have_no_import_cycles() -> None:
    cli = [name for name in MODULES if name.startswith("specprof.engine.cli")]
    assert len(cli) >= 4
    assert _cycles(cli) == []


def test_the_analyzer_modules_have_no_import_cycles() -> None:
    assert _cycles([name for name in MODULES if name.startswith("specprof.plugins.analyzers")]) == []


def _loaded_by(args: list[str], watch: tuple[str, ...]) -> list[str]:
    code = ("import json, sys\n"
            "from specprof.engine.cli import main\n"
            "try:\n"
            f"    main({args!r})\n"
            "except SystemExit:\n"
            "    pass\n"
            f"print(json.dumps(sorted(m for m in {watch!r} if m in sys.modules)))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=False)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_version_imports_nothing_numerical() -> None:
    assert _loaded_by(["--version"], HEAVY_FOR_VERSION) == []


@pytest.mark.parametrize("args", [["--help"], ["backends", "--output-format", "json"],
                                  ["plugins", "--output-format", "json"]])
def test_listing_commands_import_no_numerical_stack(args: list[str]) -> None:
    assert _loaded_by(args, HEAVY) == []
