"""Services meet in `services/common` and `schemas`, never in each other's modules: a service can then be changed,
deployed and scaled on its own, and a newcomer reading one needs no other. Read from the source with `ast`."""

from __future__ import annotations

import ast
from pathlib import Path

from services.common.settings import REPO_ROOT

SERVICES = ("api", "ingest", "executor", "projector")


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
    return out


def _crossings() -> list[tuple[str, str]]:
    found = []
    for owner in (*SERVICES, "common"):
        for path in sorted((REPO_ROOT / "services" / owner).rglob("*.py")):
            where = str(path.relative_to(REPO_ROOT))
            for module in _imports(path):
                parts = module.split(".")
                if len(parts) >= 2 and parts[0] == "services" and parts[1] in SERVICES and parts[1] != owner:
                    found.append((where, module))
    return sorted(set(found))


def test_no_service_imports_another_services_modules() -> None:
    crossings = _crossings()
    assert not crossings, "move what they share to services/common or schemas:\n" + "\n".join(
        f"  {where} imports {module}" for where, module in crossings
    )
