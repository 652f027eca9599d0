"""The shard's layout rules, checked on the source (relative, late and type-checking imports
counted): no import cycle between its modules; the building blocks never reach up to what is
built from them: attention backends and layers never import models, the engine or sampling;
the checkpoint readers never import models or layers; a model family file imports only the
shared blocks, never another family."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.router.test_layout import find_cycle

SHARD = Path(__file__).resolve().parents[2] / "shard"


def module_name(path: Path) -> str:
    parts = path.relative_to(SHARD.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path) -> set[str]:
    """Every module `path` imports, relative imports resolved."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            out.add(base)
            out |= {f"{base}.{alias.name}" for alias in node.names}
    return out


MODULES = {module_name(p): p for p in SHARD.rglob("*.py")}


def graph() -> dict[str, set[str]]:
    return {
        name: {m for m in imported(path) if m in MODULES and m != name}
        for name, path in MODULES.items()
    }


def importers(prefix: str) -> dict[str, set[str]]:
    return {n: deps for n, deps in graph().items() if n == prefix or n.startswith(prefix + ".")}


def reaches(deps: set[str], packages: tuple[str, ...]) -> set[str]:
    return {d for d in deps if any(d == p or d.startswith(p + ".") for p in packages)}


def test_the_shard_has_no_import_cycle():
    edges = {n: {d for d in deps if not n.startswith(d + ".")} for n, deps in graph().items()}
    assert find_cycle(edges) is None  # a package's __init__ is not its children's edge


def test_relative_imports_are_resolved():
    assert imported(SHARD / "models" / "__init__.py") >= {"shard.models.decoder"}


def test_blocks_never_import_what_is_built_from_them():
    upward = (
        "shard.models",
        "shard.engine.generator",
        "shard.engine.model_runner",
        "shard.sampling",
    )
    for package in ("shard.layers", "shard.attention", "shard.quant"):
        for name, deps in importers(package).items():
            if name == "shard.quant.quality":  # the quality report: it runs whole models
                continue
            assert not reaches(deps, upward), (name, reaches(deps, upward))


def test_checkpoint_readers_never_import_models_or_the_engine():
    for name, deps in importers("shard.checkpoint").items():
        assert not reaches(deps, ("shard.models", "shard.engine", "shard.sampling")), name


def test_a_family_imports_no_other_family():
    from shard.models import FAMILIES

    families = {family.__name__ for family in FAMILIES}
    for family in families:
        assert not (graph()[family] & (families - {family})), family
