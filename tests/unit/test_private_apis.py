"""White-box: the private Ray and MLflow APIs Shipyard relies on (shipyard.private_apis) are still there.

One test per use, named by it: after a Ray or MLflow upgrade, a failure here says which use moved, where
Shipyard uses it and why, before a user's run meets it.
"""

import ast
import importlib.metadata
from pathlib import Path

import pytest

from shipyard import private_apis
from shipyard.private_apis import USES, VERIFIED_ON

LIBRARY = Path(private_apis.__file__).parent


@pytest.mark.parametrize("use", USES, ids=[u.name.split(",")[0] for u in USES])
def test_each_private_use_is_still_there(use):
    try:
        use.check()
    except Exception as err:  # noqa: BLE001 - any failure is the signal
        installed = {p: importlib.metadata.version(p) for p in VERIFIED_ON}
        pytest.fail(
            f"private API {use.name} (used by {use.used_by}; {use.why}) is not as it was on {VERIFIED_ON}; "
            f"installed: {installed}: {type(err).__name__}: {err}"
        )


def _private_reaches(tree: ast.AST) -> list[tuple[int, str]]:
    """Imports of a private module or name of ray/mlflow, and `._name` attributes read off anything but
    self/cls (a private attribute of another library's object)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if _private_path(a.name)]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in ("ray", "mlflow"):
            if _private_path(node.module) or any(a.name.startswith("_") for a in node.names):
                found.append((node.lineno, f"from {node.module} import {', '.join(a.name for a in node.names)}"))
        elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            owner = ast.unparse(node.value)
            if owner not in ("self", "cls") and not owner.startswith(("self.", "cls.")):
                found.append((node.lineno, ast.unparse(node)))
    return found


def _private_path(module: str) -> bool:
    parts = module.split(".")
    return parts[0] in ("ray", "mlflow") and any(p.startswith("_") for p in parts)


def test_no_module_outside_private_apis_reaches_into_ray_or_mlflow_internals():
    """The uses above are the only ones: a new private import or attribute elsewhere must be added there."""
    offenders = [
        f"{p.relative_to(LIBRARY)}:{line}: {what}"
        for p in sorted(LIBRARY.rglob("*.py"))
        if p.name != "private_apis.py"
        for line, what in _private_reaches(ast.parse(p.read_text()))
        if not what.endswith(private_apis.IN_PLACE.get(str(p.relative_to(LIBRARY)), ()))
    ]
    assert not offenders, "private APIs used outside shipyard/private_apis.py:\n" + "\n".join(offenders)


def test_the_private_reach_check_sees_what_it_must():
    code = (
        "import mlflow.tracking._tracking_service.utils\n"
        "from ray._raylet import GcsClient\n"
        "from mlflow.pytorch import (\n    _validate_pt2_archive_is_pickle_free,\n)\n"
        "q = session._inter_actor_queue\n"
        "self._fine = 1\n"
    )
    assert [line for line, _ in _private_reaches(ast.parse(code))] == [1, 2, 3, 6]
