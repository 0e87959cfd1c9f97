"""The layout's rules, checked on the source (docs/architecture.md).

- An area (admin, binding, provisioning, guard) imports no other area: what
  one area needs of another reaches it through hooks app.py passes in.
- The shared layers (shared/, transport/, storage/, counters/ and the
  modules at the package root) import no area at all.
- Which database runs is asked once, in app.py; only storage/ and the
  stores' implementations use asyncpg or look at the dialect.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import tether.server

PACKAGE = Path(tether.server.__file__).parent
AREAS = ("admin", "binding", "provisioning", "guard")

# Wiring modules that may import every area, and why.
WIRING = {
    # Builds the stores and the areas and passes hooks between areas.
    "app.py",
    # Alembic compares the migrations with one metadata holding every table.
    "storage/migrations/env.py",
}


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _name(path: Path) -> str:
    return path.relative_to(PACKAGE).as_posix()


def _imported(path: Path) -> set[str]:
    """Every tether.server module (or package) the file imports."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            # `from tether.server import binding` names a package too.
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name.startswith("tether.server.")}


def _area_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[2] if len(parts) > 2 and parts[2] in AREAS else None


def test_no_area_imports_another_area() -> None:
    crossings: list[str] = []
    for path in _modules():
        name = _name(path)
        home = name.split("/")[0]
        if home not in AREAS:
            continue
        for module in _imported(path):
            area = _area_of(module)
            if area is not None and area != home:
                crossings.append(f"{name} imports {module}")
    assert crossings == []


def test_shared_layers_import_no_area() -> None:
    crossings: list[str] = []
    for path in _modules():
        name = _name(path)
        if name.split("/")[0] in AREAS or name in WIRING:
            continue
        crossings.extend(
            f"{name} imports {module}" for module in _imported(path) if _area_of(module)
        )
    assert crossings == []


# Asking which database runs, or reaching for the bare driver.
ENGINE_QUESTION = re.compile(
    r"\bis_sqlite\b|\bis_postgres\b|dialect\.name\b|\bdialect_name\b"
    r"|startswith\(\s*[\"'](?:sqlite|postgres)"
    r"|\bdriver_connection\b|\bdriver_transaction\b|\brun_direct\b"
)


def _may_know_the_engine(name: str) -> bool:
    stem = name.rsplit("/", 1)[-1]
    return (
        name.startswith("storage/")
        or stem.startswith("store_postgres")
        or stem == "store_sqlalchemy.py"
        # The one choice of stores, from the database URL in the settings.
        or name == "app.py"
    )


def test_only_storage_and_the_stores_know_the_database_engine() -> None:
    found: list[str] = []
    for path in _modules():
        name = _name(path)
        if _may_know_the_engine(name):
            continue
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            found.extend(f"{name} imports {n}" for n in names if n.split(".")[0] == "asyncpg")
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if ENGINE_QUESTION.search(code):
                found.append(f"{name}:{number}: {line.strip()}")
    assert found == []


def test_the_rules_see_every_area_and_layer() -> None:
    """Guards the checks above against a moved package (they would pass on nothing)."""
    tops = {_name(p).split("/")[0] for p in _modules()}
    assert set(AREAS) <= tops
    assert {"shared", "transport", "storage", "counters", "app.py"} <= tops
    binding_imports = _imported(PACKAGE / "binding" / "servicer.py")
    assert "tether.server.shared.partners" in binding_imports
