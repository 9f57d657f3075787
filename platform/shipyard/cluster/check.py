"""Check a Ray cluster file before `ray up` or `kubectl apply`: Ray's own schema, offline, and Shipyard's rules.

    >>> from shipyard.cluster.check import check_file
    >>> result = check_file("cluster.yaml")
    >>> result.ok, [str(w) for w in result.warnings if w.where == "provider.head_ip"]
    (True, ['provider.head_ip: HEAD_HOST is a placeholder; replace HEAD_HOST before `ray up`'])

`shipyard cluster check [FILE] [--allow-public]` prints the same. Nothing starts: no Ray, no SSH, no cloud API.

* Launcher files (`provider:`) go through the pure steps of `ray up`'s pre-flight (the local provider's
  prepare, Ray's defaults, the JSON schema that ships inside Ray, `validate_config`). A provider's own bootstrap
  is skipped: AWS's calls boto3 (key pairs, subnets, IAM), so an AWS file is checked without credentials.
* KubeRay manifests (`apiVersion: ray.io/v1`): no CRD schema ships with Ray, so only Shipyard's rules apply,
  plus an embedded `serveConfigV2` against Ray Serve's `ServeDeploySchema`.

Shipyard's rules: the project is installed on every node, token authentication stays on, and nothing listens
on all interfaces (0.0.0.0 or ::) unless `allow_public` says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

__all__ = ["CheckResult", "Finding", "check_file", "check_kuberay", "check_launcher"]


@dataclass(frozen=True)
class Finding:
    where: str
    """Key path in the file, e.g. `head_start_ray_commands[1]`; empty for the file as a whole."""
    message: str
    """What is wrong and how to fix it."""
    error: bool = True

    def __str__(self) -> str:
        return f"{self.where}: {self.message}" if self.where else self.message


@dataclass
class CheckResult:
    path: Path
    kind: str = "unreadable file"
    findings: list[Finding] = field(default_factory=list)
    checked: str = ""
    """What was checked against what, and what was not (KubeRay: the CRD schema)."""

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.error]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if not f.error]

    @property
    def ok(self) -> bool:
        return not self.errors


def check_file(path: str | Path, allow_public: bool = False) -> CheckResult:
    """Every problem in a Ray launcher file or KubeRay manifest; `allow_public` turns 0.0.0.0 into warnings."""
    path = Path(path)
    result = CheckResult(path)

    def cannot(message: str) -> CheckResult:
        result.findings.append(Finding("", f"{path}{message}"))
        return result

    try:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    except FileNotFoundError:
        return cannot(": no such file; pass the cluster file, e.g. `shipyard cluster check cluster.yaml`")
    except OSError as err:  # a directory, no permission
        return cannot(f": cannot read it ({err.strerror}); pass a YAML file")
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        what = " ".join(str(p) for p in (getattr(err, "context", None), getattr(err, "problem", None)) if p) or err
        return cannot(
            f"{f':{mark.line + 1}:{mark.column + 1}' if mark else ''}: not valid YAML: {what}; fix the "
            "line (indentation, a missing ':' or quote)"
        )
    if not docs:
        return cannot(": empty file; expected a Ray cluster file")
    if not all(isinstance(d, dict) for d in docs):
        return cannot(
            ": not a mapping of keys; a Ray cluster file starts with keys such as `cluster_name:` and "
            "`provider:` (or `apiVersion: ray.io/v1`)"
        )
    ray_docs = [(i, d) for i, d in enumerate(docs) if str(d.get("apiVersion", "")).startswith("ray.io/")]
    if ray_docs:  # other documents (a Secret, a ConfigMap) are Kubernetes' business
        result.kind = "KubeRay " + ", ".join(str(d.get("kind")) for _, d in ray_docs)
        result.checked = (
            "Shipyard's rules; the KubeRay CRD schema itself is not checked, `kubectl apply --dry-run=server` does that"
        )
        for i, doc in ray_docs:
            for f in check_kuberay(doc, allow_public):
                where = f"document {i + 1}: {f.where}" if len(docs) > 1 else f.where
                result.findings.append(Finding(where, f.message, f.error))
        return result
    if len(docs) > 1:
        return cannot(f": {len(docs)} YAML documents; a Ray launcher file is one")
    import ray

    provider = docs[0].get("provider")
    result.kind = f"Ray launcher file, provider {provider.get('type') if isinstance(provider, dict) else None}"
    result.checked = f"Ray {ray.__version__}'s schema and Shipyard's rules"
    result.findings += check_launcher(docs[0], allow_public)
    return result


# Imported last: the rule modules import Finding from here, so it must exist first.
from shipyard.cluster.kuberay import check_kuberay  # noqa: E402
from shipyard.cluster.launcher import check_launcher  # noqa: E402
