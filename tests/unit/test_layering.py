"""The house rules, checked on the source: the library never imports the entry points, the data
pipeline never imports the trainer, no shipped module imports bench/ or tests/, the loop imports few
project modules (it is wired from components, not a hub), the schema module imports no runtime
module, and every config field says what it is. Every import counts, those inside functions too."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Tuple

import pytest

from helpers import ROOT

LIBRARY = ("trainer", "data_pipeline")
SHIPPED = LIBRARY + ("launch",)
# What the shipped code must never import: the benchmark scripts (bench/ is put on sys.path and its
# files imported by bare name, `import throughput`) and the tests' own modules (helpers, conftest,
# wandb_records, ...), under either spelling.
NOT_SHIPPED = (
    {"bench", "tests"}
    | {p.stem for p in (ROOT / "bench").glob("*.py")}
    | {p.stem for p in (ROOT / "tests").rglob("*.py")}
)
LOOP_MAX_PROJECT_MODULES = 12

Source = Tuple[str, str, str]  # (path relative to ROOT, dotted module name, text)


def _is_module(dotted: str) -> bool:
    path = ROOT.joinpath(*dotted.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imports_in(source: str, module: str, filename: str = "<source>") -> List[Tuple[int, str]]:
    """(line, module) of every import in `source`, the text of module `module`, inside functions too.
    Relative imports are resolved against `module`; `from trainer import distributed` is
    trainer.distributed (a module), `from trainer.config import Config` is trainer.config."""
    package = module if filename.endswith("__init__.py") else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source, filename=filename)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(parent + ([node.module] if node.module else []))
            for alias in node.names:
                found.append((node.lineno, f"{base}.{alias.name}" if _is_module(f"{base}.{alias.name}") else base))
    return sorted(set(found))


def _source(path: Path) -> Source:
    rel = path.relative_to(ROOT)
    dotted = ".".join(rel.with_suffix("").parts)
    return rel.as_posix(), dotted[: -len(".__init__")] if rel.name == "__init__.py" else dotted, path.read_text()


def _sources(*packages: str) -> List[Source]:
    return [_source(path) for pkg in packages for path in sorted((ROOT / pkg).rglob("*.py"))]


def _top(mod: str) -> str:
    return mod.split(".")[0]


def bad_imports(sources: Iterable[Source], forbidden: Callable[[str], bool]) -> List[str]:
    """`path:line imports module` for each import in `sources` that `forbidden` refuses."""
    return [
        f"{rel}:{line} imports {mod}"
        for rel, dotted, text in sources
        for line, mod in imports_in(text, dotted, rel)
        if forbidden(mod)
    ]


def project_imports(source: Source) -> Dict[str, List[str]]:
    """The distinct trainer.* / data_pipeline.* modules a file imports -> where (`path:line`)."""
    rel, dotted, text = source
    out: Dict[str, List[str]] = {}
    for line, mod in imports_in(text, dotted, rel):
        if _top(mod) in LIBRARY:
            out.setdefault(mod, []).append(f"{rel}:{line}")
    return out


def _imports(path: Path):
    """(line, module) of every import in a file, including those inside functions."""
    rel, dotted, text = _source(path)
    return imports_in(text, dotted, rel)


def test_no_library_module_imports_launch():
    bad = [
        f"{p.relative_to(ROOT)}:{line} imports {mod}"
        for pkg in LIBRARY
        for p in sorted((ROOT / pkg).rglob("*.py"))
        for line, mod in _imports(p)
        if mod == "launch" or mod.startswith("launch.")
    ]
    assert not bad, bad


def test_the_schema_module_imports_no_runtime_module():
    allowed = ("__future__", "dataclasses", "enum", "importlib", "re", "typing", "warnings", "hydra", "omegaconf")
    path = ROOT / "trainer" / "config.py"
    bad = [
        f"trainer/config.py:{line} imports {mod}"
        for line, mod in _imports(path)
        if mod.split(".")[0] not in allowed and mod != "data_pipeline.choices"
    ]  # the vocabulary: a leaf
    assert not bad, bad


@pytest.mark.parametrize("leaf", ["choices.py", "filesync.py"])
def test_the_shared_leaves_import_nothing_of_the_project(leaf):
    """data_pipeline/choices.py (the vocabulary the schemas and the data pipeline share) and
    data_pipeline/filesync.py (the file-sync primitives of the data pipeline and the trainer)."""
    path = ROOT / "data_pipeline" / leaf
    bad = [
        f"data_pipeline/{leaf}:{line} imports {mod}"
        for line, mod in _imports(path)
        if mod.split(".")[0] in ("trainer", "data_pipeline", "launch", "bench")
    ]
    assert not bad, bad


def test_every_config_field_has_a_docstring():
    """A field's docstring is the string literal right under it (as torchtitan writes them)."""
    from trainer import config

    tree = ast.parse((ROOT / "trainer" / "config.py").read_text())
    documented = set()
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
        for field, after in zip(cls.body, cls.body[1:] + [None]):
            if (
                isinstance(field, ast.AnnAssign)
                and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                documented.add(f"{cls.name}.{field.target.id}")
    schemas = [c for c in vars(config).values() if dataclasses.is_dataclass(c) and c.__module__ == config.__name__]
    fields = {f"{c.__name__}.{f.name}" for c in schemas for f in dataclasses.fields(c)}
    assert len(schemas) >= 12 and fields
    assert sorted(fields - documented) == []


def test_the_data_pipeline_imports_nothing_from_the_trainer():
    """data_pipeline/ sits below trainer/: it turns files into rows and knows nothing of training."""
    bad = bad_imports(_sources("data_pipeline"), lambda mod: _top(mod) == "trainer")
    assert not bad, "data_pipeline/ must not import trainer:\n" + "\n".join(bad)


def test_nothing_shipped_imports_bench_or_the_tests():
    bad = bad_imports(_sources(*SHIPPED), lambda mod: _top(mod) in NOT_SHIPPED)
    assert not bad, "trainer/, data_pipeline/ and launch/ must not import bench/ or tests/:\n" + "\n".join(bad)


def test_the_loop_imports_few_project_modules():
    """trainer/loop.py runs the steps and calls the components it is handed; each module it imports
    is one more thing that changes it. Distinct trainer.* / data_pipeline.* modules, at most 12."""
    found = project_imports(_source(ROOT / "trainer" / "loop.py"))
    listing = "\n".join(f"{where[0]} imports {mod}" for mod, where in sorted(found.items()))
    assert len(found) <= LOOP_MAX_PROJECT_MODULES, (
        f"trainer/loop.py imports {len(found)} project modules (at most {LOOP_MAX_PROJECT_MODULES}):\n{listing}"
    )


def test_the_import_checks_flag_a_bad_source():
    """The checks above are not vacuous: a literal module that breaks each rule is caught, with its line."""
    bad = (
        "import os\n"
        "from trainer import distributed, config\n"
        "def f():\n"
        "    from .packing import IGNORE\n"
        "    import helpers, throughput\n"
        "    from bench.harness import run\n"
    )
    src = [("data_pipeline/x.py", "data_pipeline.x", bad)]
    assert imports_in(bad, "data_pipeline.x") == [
        (1, "os"),
        (2, "trainer.config"),
        (2, "trainer.distributed"),
        (4, "data_pipeline.packing"),
        (5, "helpers"),
        (5, "throughput"),
        (6, "bench.harness"),
    ]
    assert bad_imports(src, lambda mod: _top(mod) == "trainer") == [
        "data_pipeline/x.py:2 imports trainer.config",
        "data_pipeline/x.py:2 imports trainer.distributed",
    ]
    assert bad_imports(src, lambda mod: _top(mod) in NOT_SHIPPED) == [
        "data_pipeline/x.py:5 imports helpers",
        "data_pipeline/x.py:5 imports throughput",
        "data_pipeline/x.py:6 imports bench.harness",
    ]
    assert sorted(project_imports(src[0])) == ["data_pipeline.packing", "trainer.config", "trainer.distributed"]
