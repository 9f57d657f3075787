"""White-box: the private Ray and MLflow APIs Shipyard relies on (shipyard.private_apis) are still there.

One test per use, named by it: after a Ray or MLflow upgrade, a failure here says which use moved, where
Shipyard uses it and why, before a user's run meets it.
"""

import importlib.metadata
import re
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


def test_no_module_outside_private_apis_reaches_into_ray_or_mlflow_internals():
    """The uses above are the only ones: a new `_private`/`_internal` import elsewhere must be added here."""
    pattern = re.compile(
        r"(ray|mlflow)[\w.]*\.(_private|_internal)\b|from (ray|mlflow)[\w.]* import .*\b_\w"
        r"|\._get_client\(|\._trial_runs\b"
    )
    offenders = [
        f"{p.relative_to(LIBRARY)}:{n}: {line.strip()}"
        for p in sorted(LIBRARY.rglob("*.py"))
        if p.name != "private_apis.py"
        for n, line in enumerate(p.read_text().splitlines(), 1)
        if pattern.search(line) and not line.lstrip().startswith("#")
    ]
    assert not offenders, "private Ray/MLflow APIs used outside shipyard/private_apis.py:\n" + "\n".join(offenders)
