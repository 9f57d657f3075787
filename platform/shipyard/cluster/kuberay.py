"""KubeRay manifests (`apiVersion: ray.io/v1`): Shipyard's rules for a RayCluster, RayJob or RayService,
the install rule for its groups' containers, and an embedded serveConfigV2 against Ray Serve's schema."""

from __future__ import annotations

import re
import warnings
from typing import Any

import yaml

from shipyard.cluster.check import Finding
from shipyard.cluster.launcher import _shell_steps
from shipyard.cluster.rules import (
    Parts,
    _auth_disabled,
    _dashboard_bind,
    _mapping,
    _path,
    _placeholders,
    _public_binds,
    _strings,
)

KUBERAY_KINDS = ("RayCluster", "RayJob", "RayService")


# ---------------------------------------------------------------------------------------------------------------
# KubeRay manifests


def check_kuberay(doc: dict[str, Any], allow_public: bool = False) -> list[Finding]:
    import ray

    kind, spec = doc.get("kind"), doc.get("spec")
    if kind not in KUBERAY_KINDS:
        return [
            Finding(
                "kind",
                f"{kind!r}: Shipyard has rules for {', '.join(KUBERAY_KINDS)} only; nothing else checked",
                error=False,
            )
        ]
    if not isinstance(spec, dict):
        return [Finding("spec", f"missing; a {kind} needs a `spec:` mapping")]
    # serveConfigV2 is YAML in a string: _serve_config parses it and names the key inside it.
    outside_serve = {k: v for k, v in doc.items() if k != "spec"} | {
        "spec": {k: v for k, v in spec.items() if k != "serveConfigV2"}
    }
    findings = _auth_disabled(doc) + _public_binds(outside_serve, allow_public)
    cluster_at = ("spec",) if kind == "RayCluster" else ("spec", "rayClusterConfig")
    cluster = spec if kind == "RayCluster" else spec.get("rayClusterConfig")
    if not isinstance(cluster, dict):
        if kind == "RayJob" and spec.get("clusterSelector"):
            return findings + [
                Finding(
                    "spec.clusterSelector",
                    "the job runs on an existing RayCluster; check that cluster's manifest for auth and binds",
                    error=False,
                )
            ]
        return findings + [Finding(_path(cluster_at), "missing; the Ray cluster's spec goes here")]
    auth = cluster.get("authOptions")
    if not isinstance(auth, dict) or auth.get("mode") != "token":
        findings.append(
            Finding(
                _path(cluster_at + ("authOptions",)),
                ("missing" if not isinstance(auth, dict) else f"mode is {auth.get('mode')!r}")
                + ": Ray token authentication is off, so anyone who reaches the pods' ports can run "
                "code; set `authOptions: {mode: token, secretName: <Secret with key auth_token>}` "
                "(KubeRay >= 1.5.1; without secretName the operator generates the token)",
            )
        )
    version = cluster.get("rayVersion")
    if str(version) != ray.__version__:
        findings.append(
            Finding(
                _path(cluster_at + ("rayVersion",)),
                f"{'missing' if version is None else repr(version)}, but Shipyard runs Ray "
                f'{ray.__version__}; set `rayVersion: "{ray.__version__}"` and images '
                f"rayproject/ray:{ray.__version__}-py311-cpu (or -gpu)",
            )
        )
    for parts, image in _strings(cluster, cluster_at):
        if parts[-1] == "image" and re.match(r"(docker\.io/)?rayproject/ray(-ml)?:", image):
            tag = image.split(":", 1)[1]
            if not tag.startswith(f"{ray.__version__}"):
                findings.append(
                    Finding(
                        _path(parts),
                        f"{image} does not run Ray {ray.__version__}; use "
                        f"rayproject/ray:{ray.__version__}-py311-cpu (or -gpu)",
                    )
                )
    head_params = _mapping(_mapping(cluster, "headGroupSpec"), "rayStartParams")
    if "dashboard-host" in head_params:
        host = head_params["dashboard-host"]
        findings += _dashboard_bind(
            _path(cluster_at + ("headGroupSpec", "rayStartParams", "dashboard-host")),
            "" if host is None else str(host),
            allow_public,
            "`kubectl port-forward`",
        )
    else:
        # A RayJob's submitter pod reaches the dashboard through the head Service: there the exposure is the price.
        fix = (
            "a RayJob's submitter needs it on the pod network, so pass --allow-public if that is meant"
            if kind == "RayJob"
            else 'set it to "127.0.0.1" and reach it with `kubectl port-forward`'
        )
        findings.append(
            Finding(
                _path(cluster_at + ("headGroupSpec", "rayStartParams", "dashboard-host")),
                f"not set, and KubeRay then starts the dashboard on 0.0.0.0; {fix}"
                + (" (allowed by --allow-public)" if allow_public else ""),
                error=not allow_public,
            )
        )
    if "serveConfigV2" in spec:
        findings += _serve_config(spec["serveConfigV2"], ("spec", "serveConfigV2"), allow_public)
    return findings + _kuberay_install(cluster, cluster_at) + _placeholders(doc, "`kubectl apply`")


def _kuberay_install(cluster: dict[str, Any], cluster_at: Parts) -> list[Finding]:
    """Shipyard in every group's Ray container (KubeRay's is the first): installed by its command/args, or in its
    image, unless that is a stock rayproject/ray image."""
    workers = cluster.get("workerGroupSpecs")
    groups = {("headGroupSpec",): cluster.get("headGroupSpec")}
    groups |= {("workerGroupSpecs", i): g for i, g in enumerate(workers if isinstance(workers, list) else [])}
    findings = []
    for group, node in groups.items():
        where = _path(cluster_at + group + ("template", "spec", "containers", 0))
        containers = _mapping(_mapping(node, "template"), "spec").get("containers")
        container = containers[0] if isinstance(containers, list) and containers else None
        if not isinstance(container, dict):
            findings.append(Finding(where, "missing: the group's Ray container (KubeRay takes the first)"))
            continue
        env = container.get("env") if isinstance(container.get("env"), list) else []
        env = {str(e["name"]): str(e["value"]) for e in env if isinstance(e, dict) and {"name", "value"} <= e.keys()}
        argv = [str(w) for k in ("command", "args") if isinstance(v := container.get(k), list) for w in v]
        if any(what == "install" for what, _ in _shell_steps(" ".join(argv), env)):
            continue
        image = str(container.get("image") or "")
        if image and not re.match(r"(docker\.io/)?rayproject/ray", image):
            findings.append(
                Finding(
                    where,
                    f"nothing in command/args installs Shipyard, so {image} (not a stock "
                    "rayproject/ray image) is taken to have it installed; make sure it does",
                    error=False,
                )
            )
        else:
            findings.append(
                Finding(
                    where,
                    f"{image or 'no image'} has no Shipyard and nothing in command/args "
                    "installs it, so trials, training workers and Serve replicas there cannot "
                    'import it; run `pip install "$SHIPYARD_SOURCE"` (an archive or git URL of the '
                    "project, set in env) before `$KUBERAY_GEN_RAY_START_CMD` in args, as "
                    "platform/kuberay/raycluster.yaml does, or use an image with Shipyard installed",
                )
            )
    return findings


def _serve_config(text: Any, parts: Parts, allow_public: bool) -> list[Finding]:
    from pydantic import ValidationError

    with warnings.catch_warnings():  # Ray Serve's own pydantic deprecations, printed when it is imported
        warnings.simplefilter("ignore", DeprecationWarning)
        from ray.serve.schema import ServeDeploySchema

    try:
        config = yaml.safe_load(text) if isinstance(text, str) else text
    except yaml.YAMLError as err:
        return [Finding(_path(parts), f"not valid YAML: {err}")]
    findings = [
        Finding(f"{_path(parts)} -> {f.where}", f.message, f.error) for f in _public_binds(config, allow_public)
    ]
    try:
        ServeDeploySchema.model_validate(config)
    except ValidationError as err:
        findings += [
            Finding(f"{_path(parts)} -> {_path(e['loc'])}", f"{e['msg']} (Ray Serve's ServeDeploySchema)")
            for e in err.errors()
        ]
    return findings
