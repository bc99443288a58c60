"""The house rules, checked on the source: the library never imports the entry points, the schema
module imports no runtime module, and every config field says what it is."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

from helpers import ROOT

LIBRARY = ("trainer", "data_pipeline")


def _imports(path: Path):
    """(line, module) of every import in a file, including those inside functions."""
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.lineno, node.module


def test_no_library_module_imports_launch():
    bad = [f"{p.relative_to(ROOT)}:{line} imports {mod}" for pkg in LIBRARY for p in sorted((ROOT / pkg).rglob("*.py"))
           for line, mod in _imports(p) if mod == "launch" or mod.startswith("launch.")]
    assert not bad, bad


def test_the_schema_module_imports_no_runtime_module():
    allowed = ("__future__", "dataclasses", "enum", "importlib", "re", "typing", "warnings", "hydra", "omegaconf")
    path = ROOT / "trainer" / "config.py"
    bad = [f"trainer/config.py:{line} imports {mod}" for line, mod in _imports(path)
           if mod.split(".")[0] not in allowed]
    assert not bad, bad


def test_every_config_field_has_a_docstring():
    """A field's docstring is the string literal right under it (as torchtitan writes them)."""
    from trainer import config

    tree = ast.parse((ROOT / "trainer" / "config.py").read_text())
    documented = set()
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
        for field, after in zip(cls.body, cls.body[1:] + [None]):
            if isinstance(field, ast.AnnAssign) and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant) \
                    and isinstance(after.value.value, str):
                documented.add(f"{cls.name}.{field.target.id}")
    schemas = [c for c in vars(config).values() if dataclasses.is_dataclass(c) and c.__module__ == config.__name__]
    fields = {f"{c.__name__}.{f.name}" for c in schemas for f in dataclasses.fields(c)}
    assert len(schemas) >= 12 and fields
    assert sorted(fields - documented) == []
