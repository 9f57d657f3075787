"""The library's shape: imports run one way, modules read in one sitting, no hidden process-wide state.

Layers, from the bottom: the shared pieces (config, errors, the private-API wrapper), then the stages in the
order they build on each other, then the driver (the pipeline, the `shipyard` command, start-up, the public API).
A module imports only from its own package or from a layer below it: never from a stage above it, never the
driver. Read from the code with `ast`, function-level imports included.
"""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LIBRARY = ROOT / "platform" / "shipyard"

LAYERS = [
    {
        "shipyard.errors",
        "shipyard.config",
        "shipyard.config_yaml",
        "shipyard.serve_config",
        "shipyard.scaling_config",
        "shipyard.private_apis",
    },  # shared
    {"shipyard.cluster"},  # attaching to Ray, checking cluster files
    {"shipyard.data"},  # 1. data
    {"shipyard.tasks"},  # what is trained: the task seam, the networks
    {"shipyard.train"},  # 4. train (the training step is its own: perf counts it)
    {"shipyard.tune"},  # 3. tune: trials run the train stage's loop
    {"shipyard.perf"},  # 2. plan: prices the train stage's step and the tune stage's search
    {"shipyard.track"},  # 5-6. track and promote
    {"shipyard.serve"},  # 7. serve
    {
        "shipyard.pipeline",
        "shipyard.pipeline_stages",
        "shipyard.pipeline_plan",
        "shipyard.report",
        "shipyard.cli",
        "shipyard.startup",
        "shipyard",
        "shipyard.__main__",
    },  # the driver
]
STAGES = {"data", "tasks", "train", "tune", "perf", "track", "serve", "cluster"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(LIBRARY.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _unit(module: str) -> tuple[int, str]:
    """(layer, package) of a module: the package is a stage's (shipyard.train) or the module itself."""
    parts = module.split(".")
    package = ".".join(parts[:2]) if len(parts) > 1 and parts[1] in STAGES else module
    for rank, layer in enumerate(LAYERS):
        if package in layer:
            return rank, package
    raise AssertionError(f"{module} is in no layer of tests/unit/test_architecture.py: add it to LAYERS")


def _imports(tree: ast.AST) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("shipyard")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("shipyard"):
            if node.module == "shipyard":  # from shipyard import config -> shipyard.config
                found += [(node.lineno, f"shipyard.{a.name}") for a in node.names]
            else:
                found.append((node.lineno, node.module))
    return found


MODULES = sorted(LIBRARY.rglob("*.py"))


def test_imports_run_from_the_driver_down_to_the_stages_and_shared_pieces():
    upward = []
    for path in MODULES:
        importer = _module_name(path)
        rank, package = _unit(importer)
        for line, imported in _imports(ast.parse(path.read_text())):
            if imported == "shipyard" or imported.startswith("shipyard.__"):
                imported_rank, imported_package = len(LAYERS) - 1, "shipyard"
            else:
                imported_rank, imported_package = _unit(imported)
            if imported_rank > rank or (imported_rank == rank and imported_package != package and rank not in (0,)):
                if rank == len(LAYERS) - 1:
                    continue  # the driver's modules use each other
                upward.append(f"{path.relative_to(ROOT)}:{line}: {importer} imports {imported}")
    assert not upward, "imports against the layering (see this test's docstring):\n" + "\n".join(upward)


def test_the_layering_is_checked_against_real_imports():
    """The check above must see what it checks: the pipeline imports every stage, a stage imports config."""
    driver = {
        m for f in ("pipeline.py", "pipeline_stages.py") for _, m in _imports(ast.parse((LIBRARY / f).read_text()))
    }
    assert {"shipyard.track", "shipyard.data.tables", "shipyard.config", "shipyard.tune"} <= driver
    assert _unit("shipyard.tune.search") == (5, "shipyard.tune")
    assert _unit("shipyard.config") == (0, "shipyard.config")


@pytest.mark.parametrize("path", MODULES + sorted((ROOT / "harness").glob("*.py")), ids=lambda p: p.name)
def test_no_module_is_over_400_lines(path):
    lines = len(path.read_text().splitlines())
    assert lines <= 400, f"{path.relative_to(ROOT)} has {lines} lines: split it by reason to change"


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


def _inside_catch_warnings(tree: ast.AST, target: ast.AST) -> bool:
    for node in ast.walk(tree):
        if isinstance(node, ast.With) and any("catch_warnings" in ast.unparse(i.context_expr) for i in node.items):
            if any(target is inner for inner in ast.walk(node)):
                return True
    return False


STARTUP = LIBRARY / "startup.py"


def _hidden_state(tree: ast.AST, may_write_env: bool) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Delete)):
            targets = node.targets if isinstance(node, (ast.Assign, ast.Delete)) else [node.target]
            for t in targets:
                base = t.value if isinstance(t, ast.Subscript) else t
                if ast.unparse(base) in ("os.environ", "environ") and not may_write_env:
                    found.append((node.lineno, f"writes {ast.unparse(t)}"))
        if isinstance(node, ast.ImportFrom) and node.module == "os" and not may_write_env:
            found += [(node.lineno, "from os import environ") for a in node.names if a.name in ("environ", "putenv")]
        if isinstance(node, ast.ImportFrom) and node.module == "warnings":
            found += [(node.lineno, f"from warnings import {a.name}") for a in node.names if "filter" in a.name]
        if isinstance(node, ast.Import):
            found += [
                (node.lineno, f"import warnings as {a.asname}") for a in node.names if a.name == "warnings" and a.asname
            ]
    for call, name in _calls(tree):
        if re.fullmatch(r"os\.(environ\.(setdefault|update|pop|popitem|clear|__setitem__)|putenv|unsetenv)", name):
            if not may_write_env:
                found.append((call.lineno, name))
        if name in ("warnings.filterwarnings", "warnings.simplefilter") and not _inside_catch_warnings(tree, call):
            found.append((call.lineno, f"{name} outside `with warnings.catch_warnings()`"))
    for cls in (n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)):
        for node in ast.walk(cls):
            for t in getattr(node, "targets", [getattr(node, "target", None)]):
                if isinstance(t, ast.Attribute) and ast.unparse(t.value) in ("type(self)", "self.__class__", cls.name):
                    found.append((node.lineno, f"{ast.unparse(t)} written by an instance"))
    return found


def test_no_hidden_process_wide_state_in_library_code():
    """Only shipyard/startup.py writes the environment (entry points call it at start-up, shipyard.run before it
    starts Ray); no warning filter is set for the whole process (a `with warnings.catch_warnings()` scope is
    fine); no method writes its class's attributes. (Loggers' levels and Ray Data's progress bars, set by
    cluster.attach when it starts Ray, are the process's logging, not hidden state.)"""
    found = [
        f"{path.relative_to(LIBRARY)}:{line}: {what}"
        for path in MODULES
        for line, what in _hidden_state(ast.parse(path.read_text()), may_write_env=path == STARTUP)
    ]
    assert not found, "process-wide state written by library code:\n" + "\n".join(found)


def test_the_hidden_state_check_sees_what_it_must():
    code = (
        "import os\nfrom os import environ\nimport warnings as w\n"
        "os.environ['A'] = '1'\ndel os.environ['A']\nos.environ |= {}\nos.environ.setdefault('A', '1')\n"
        "warnings.simplefilter('ignore')\n"
        "with warnings.catch_warnings():\n    warnings.simplefilter('ignore')\n"
        "class C:\n    n = 0\n    def f(self):\n        type(self).n = 1\n        C.n = 2\n        self.n = 3\n"
    )
    lines = sorted({line for line, _ in _hidden_state(ast.parse(code), may_write_env=False)})
    assert lines == [2, 3, 4, 5, 6, 7, 8, 14, 15]


def test_the_library_imports_no_test_demo_or_pipeline_code():
    found = []
    for path in MODULES:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            found += [
                f"{path.relative_to(LIBRARY)}:{node.lineno}: {n}"
                for n in names
                if n.split(".")[0] in ("harness", "tests", "bench", "pipelines", "serving")
            ]
    assert not found, "the library must not import test, demo, bench or pipeline code:\n" + "\n".join(found)


def test_readme_names_the_package_of_every_stage():
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("| stage |") : readme.index("## The two commands")]
    for stage, package in {
        "data": "shipyard/data/",
        "plan": "shipyard/perf/",
        "tune": "shipyard/tune/",
        "train": "shipyard/train/",
        "track": "shipyard/track/",
        "promote": "shipyard/track/",
        "serve": "shipyard/serve/",
    }.items():
        row = next((r for r in table.splitlines() if r.startswith(f"| {stage} |")), "")
        assert package in row, f"README's stage table: the {stage} row does not name {package}"
        assert (ROOT / "platform" / package).is_dir()
