"""Check a Ray cluster file before `ray up` or `kubectl apply`: Ray's own schema, offline, and Shipyard's rules.

    >>> from shipyard.clusterfile import check_file
    >>> result = check_file("cluster.yaml")
    >>> result.ok, [str(w) for w in result.warnings][:1]
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

import contextlib
import copy
import difflib
import io
import json
import logging
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import yaml

Parts = tuple[Any, ...]

# What counts as installing Shipyard: the README's `make install`, the script it runs, or a pip install of the
# project (`-e .`, a path or URL naming shipyard, a git+ URL).
INSTALL = re.compile(r"\bmake\b[^;&|]*\binstall\b|scripts/install\.sh"
                     r"|\bpip3?\s+install\b[^;&|]*?(?:\s-e\s|\s\.(?:\[[\w,-]*\])?(?=\s|$)|shipyard|git\+)")
RAY_START = re.compile(r"(?:^|(?<=[\s;&|(/]))ray\s+start\b")
# `RAY_AUTH_MODE=token [X=1 ...] ray start` (the text before `ray start`), or exported earlier in the command
TOKEN_INLINE = re.compile(r"RAY_AUTH_MODE=['\"]?token['\"]?\s+(?:\w+=\S*\s+)*$")
TOKEN_EXPORT = re.compile(r"\bexport\s+(?:\w+=\S*\s+)*RAY_AUTH_MODE=['\"]?token\b")
AUTH_DISABLED = re.compile(r"RAY_AUTH_MODE\s*=\s*['\"]?disabled")
ALL_INTERFACES = re.compile(r"(?<![\w.:])0\.0\.0\.0(?![\d.])|(?<![\w:])(?:\[::\]|::)(?![\w:])")
DASHBOARD_HOST = re.compile(r"--dashboard-host(?:=|\s+)['\"]?([^\s'\";&|]+)")
LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}
# Placeholders the shipped files use; `$RAY_HEAD_IP`-style shell variables are not placeholders.
PLACEHOLDER = re.compile(r"(?<![$\w{])(HEAD_HOST|WORKER_HOST_\d+|YOUR_[A-Z0-9_]+)\b")
# Providers whose node resources `ray up` looks up from the cloud when a node type leaves them out.
RESOURCES_AUTOFILLED = {"aws"}
KUBERAY_KINDS = ("RayCluster", "RayJob", "RayService")


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
    try:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    except FileNotFoundError:
        result.findings.append(Finding("", f"{path}: no such file; pass the cluster file, e.g. "
                                            "`shipyard cluster check cluster.yaml`"))
        return result
    except OSError as err:  # a directory, no permission
        result.findings.append(Finding("", f"{path}: cannot read it ({err.strerror}); pass a YAML file"))
        return result
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        what = " ".join(str(p) for p in (getattr(err, "context", None), getattr(err, "problem", None)) if p) or err
        result.findings.append(Finding("", f"{where}: not valid YAML: {what}; fix the line (indentation, "
                                            "a missing ':' or quote)"))
        return result
    if not docs:
        result.findings.append(Finding("", f"{path}: empty file; expected a Ray cluster file"))
        return result
    if not all(isinstance(d, dict) for d in docs):
        result.findings.append(Finding("", f"{path}: not a mapping of keys; a Ray cluster file starts with keys "
                                            "such as `cluster_name:` and `provider:` (or `apiVersion: ray.io/v1`)"))
        return result
    ray_docs = [(i, d) for i, d in enumerate(docs) if str(d.get("apiVersion", "")).startswith("ray.io/")]
    if ray_docs:  # other documents (a Secret, a ConfigMap) are Kubernetes' business
        result.kind = "KubeRay " + ", ".join(str(d.get("kind")) for _, d in ray_docs)
        result.checked = ("Shipyard's rules; the KubeRay CRD schema itself is not checked, "
                          "`kubectl apply --dry-run=server` does that")
        for i, doc in ray_docs:
            for f in check_kuberay(doc, allow_public):
                where = f"document {i + 1}: {f.where}" if len(docs) > 1 else f.where
                result.findings.append(Finding(where, f.message, f.error))
        return result
    if len(docs) > 1:
        result.findings.append(Finding("", f"{path}: {len(docs)} YAML documents; a Ray launcher file is one"))
        return result
    import ray

    provider = docs[0].get("provider")
    result.kind = f"Ray launcher file, provider {provider.get('type') if isinstance(provider, dict) else None}"
    result.checked = f"Ray {ray.__version__}'s schema and Shipyard's rules"
    result.findings += check_launcher(docs[0], allow_public)
    return result


# ---------------------------------------------------------------------------------------------------------------
# Launcher files: Ray's pre-flight, offline


def check_launcher(cfg: dict[str, Any], allow_public: bool = False) -> list[Finding]:
    from ray.autoscaler._private.providers import _DEFAULT_CONFIGS, _get_default_config

    provider = cfg.get("provider")
    if not isinstance(provider, dict) or not isinstance(provider.get("type"), str):
        return [Finding("provider", "missing, or without `type`; a Ray cluster launcher file needs e.g. "
                                    "`provider: {type: local, head_ip: ..., worker_ips: [...]}` or "
                                    "`provider: {type: aws, region: us-west-2}`")]
    ptype, known = provider["type"], sorted({*_DEFAULT_CONFIGS, "external"})
    if ptype == "kuberay":
        return [Finding("provider.type", "`kuberay` is the provider KubeRay's autoscaler writes for itself; for "
                                         "Kubernetes write a RayCluster manifest (platform/kuberay/raycluster.yaml)")]
    if ptype not in known:
        public = [k for k in known if not k.startswith("fake_") and k != "readonly"]  # Ray's test providers
        hint = difflib.get_close_matches(ptype, public, n=1)
        return [Finding("provider.type", f"{ptype!r} is not a provider Ray's cluster launcher knows"
                                         + (f"; did you mean {hint[0]!r}?" if hint else "")
                                         + f" Providers: {', '.join(public)}")] + _launcher_rules(cfg, allow_public)
    # Ray fills every top-level key the file leaves out from the provider's defaults (fillout_defaults), so
    # Shipyard's rules read the same merged file `ray up` runs: an omitted head_start_ray_commands is Ray's.
    defaults = _get_default_config(provider)
    findings = _launcher_rules({**defaults, **cfg}, allow_public)
    from_ray = {k for k in defaults if k not in cfg}
    findings = [Finding(f.where, f"{f.message} (Ray's default for {f.where.split('[')[0]}: the file does not "
                                 "set it)", f.error) if re.split(r"[.\[]", f.where)[0] in from_ray else f
                for f in findings]
    return _ray_preflight(cfg, ptype) + findings


def _ray_preflight(cfg: dict[str, Any], ptype: str) -> list[Finding]:
    """`ray up`'s pure pre-flight steps (ray.autoscaler._private.util), collecting every schema error."""
    import click
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private import util
    from ray.autoscaler._private.local.config import prepare_local

    findings: list[Finding] = []
    staged = copy.deepcopy(cfg)
    if ptype in RESOURCES_AUTOFILLED:  # `ray up` asks the cloud for these; offline they stay empty
        for name, node_type in (staged.get("available_node_types") or {}).items():
            if isinstance(node_type, dict) and "resources" not in node_type:
                node_type["resources"] = {}
                findings.append(Finding(_path(("available_node_types", name, "resources")),
                                        "not set; `ray up` looks the instance type's CPUs/GPUs up in AWS (not "
                                        "done here); declare them, e.g. `resources: {CPU: 4, GPU: 1}`", error=False))
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    ray_output = io.StringIO()  # Ray's cli_logger prints its warnings; they come back as findings
    with contextlib.redirect_stdout(ray_output), contextlib.redirect_stderr(ray_output), _quiet("ray.autoscaler"):
        if ptype == "local":  # missing head_ip, available_node_types on-prem: ClickException
            try:
                prepare_local(staged)
            except click.ClickException as err:
                findings.append(_local_provider_finding(err.message, cfg))
        try:
            # fillout_defaults merges the provider's defaults and drops the legacy min_workers, as prepare_config
            # does; iter_errors lists every violation where validate_config stops at the first.
            filled = util.fillout_defaults(copy.deepcopy(staged))
            validator = jsonschema.validators.validator_for(schema)(schema)
            for err in sorted(validator.iter_errors(filled), key=lambda e: [str(p) for p in e.absolute_path]):
                findings += _schema_findings(err)
            if not any(f.error for f in findings):  # the exact sequence `ray up` runs, for its extra checks
                util.validate_config(util.prepare_config(staged))
        except click.ClickException as err:
            findings.append(Finding("", f"ray up's pre-flight stops: {err.message}"))
        except jsonschema.ValidationError as err:
            findings += _schema_findings(err)
        except (ValueError, RuntimeError, TypeError, KeyError, AttributeError) as err:
            findings.append(Finding("", f"ray up's pre-flight stops: {type(err).__name__}: {err}"))
    for line in ray_output.getvalue().splitlines():
        text = re.sub(r"\x1b\[[0-9;]*m", "", line)
        if " WARN " in text:
            findings.append(Finding("", "Ray: " + text.split(" -- ", 1)[-1].strip(), error=False))
    return findings


def _local_provider_finding(message: str, cfg: dict[str, Any]) -> Finding:
    provider = cfg["provider"]
    if "head_ip" in message or "worker_ips" in message:
        key = "head_ip" if "head_ip" not in provider else "worker_ips"
        example = "`head_ip: HEAD_HOST` (the head machine's address)" if key == "head_ip" else \
                  "`worker_ips: [WORKER_HOST_1]` (the workers' addresses)"
        return Finding(f"provider.{key}", f"missing; the local provider needs {example}, or a "
                                          f"`coordinator_address` (Ray: {message})")
    if "available_node_types" in message:
        return Finding("available_node_types", "not allowed with `provider.type: local`; remove it and declare "
                                               "GPUs on `ray start` (--num-gpus=N) in the start commands "
                                               f"(Ray: {message})")
    if "max_workers" in message:
        return Finding("max_workers", f"required with `coordinator_address`; set it (Ray: {message})")
    return Finding("provider", message)


def _schema_findings(err: Any) -> list[Finding]:
    parts = tuple(err.absolute_path)
    if err.validator == "additionalProperties" and isinstance(err.instance, dict):
        allowed = sorted(err.schema.get("properties", {}))
        patterns = err.schema.get("patternProperties", {})
        out = []
        for key in [k for k in err.instance if k not in allowed and not any(re.search(p, k) for p in patterns)]:
            owner = "a Ray cluster file" if not parts else f"`{_path(parts)}`"
            hint = difflib.get_close_matches(key, allowed, n=1)
            out.append(Finding(_path(parts + (key,)), f"not a field of {owner} ({err.message}); "
                               + (f"did you mean {hint[0]}?" if hint else f"fields: {', '.join(allowed)}")))
        return out
    if err.validator == "required":
        missing = re.match(r"'(.+?)' is a required property", err.message)
        return [Finding(_path(parts + ((missing.group(1),) if missing else ())), f"missing ({err.message})")]
    description = err.schema.get("description")
    return [Finding(_path(parts) or "(top level)", err.message + (f" ({description})" if description else ""))]


# ---------------------------------------------------------------------------------------------------------------
# Launcher files: Shipyard's rules


def _launcher_rules(cfg: dict[str, Any], allow_public: bool) -> list[Finding]:
    findings = _install_rules(cfg)
    findings += _auth_disabled(cfg) + _public_binds(cfg, allow_public)
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = 0
        for i, cmd in enumerate(_commands(cfg, key)):
            for m in RAY_START.finditer(cmd):
                starts += 1
                before = re.sub(r"\S*$", "", cmd[:m.start()])  # drop a path before `ray`: ~/x/.venv/bin/ray
                if not (TOKEN_INLINE.search(before) or TOKEN_EXPORT.search(before)):
                    findings.append(Finding(f"{key}[{i}]", "`ray start` without RAY_AUTH_MODE=token: it turns token "
                                            "auth on only where a token already exists, and a worker started "
                                            "without it cannot join a head that has it; write "
                                            "`RAY_AUTH_MODE=token ray start ...`"))
            host = DASHBOARD_HOST.search(cmd)
            if key.startswith("head") and host and host.group(1) not in LOOPBACK \
                    and not ALL_INTERFACES.search(host.group(1)):
                findings.append(Finding(f"{key}[{i}]", f"the dashboard listens on {host.group(1)}, reachable from "
                                        "the network; keep --dashboard-host=127.0.0.1 and use `ray dashboard "
                                        "<cluster file>` (an SSH tunnel)", error=not allow_public))
        if not starts:
            findings.append(Finding(key, "no `ray start`: these nodes would not join the cluster"))
    token_mounted = any(str(remote).rstrip("/").endswith("auth_token") for remote in _mapping(cfg, "file_mounts"))
    token_in_env = any("RAY_AUTH_TOKEN" in c for k in ("head_start_ray_commands", "worker_start_ray_commands")
                       for c in _commands(cfg, k))
    if not (token_mounted or token_in_env):
        findings.append(Finding("file_mounts", "no Ray auth token reaches the nodes: with RAY_AUTH_MODE=token "
                                "`ray start` fails without one, and every node needs the same token. Run `ray "
                                "get-auth-token --generate` here and add `~/.ray/auth_token: ~/.ray/auth_token`"))
    for remote, local in _mapping(cfg, "file_mounts").items():
        source = Path(os.path.expanduser(str(local)))  # relative to the cwd, as `ray up` reads it
        if not source.exists():
            fix = "run `ray get-auth-token --generate` first" if str(remote).endswith("auth_token") else \
                  "run `ray up` from the directory it is relative to"
            findings.append(Finding(_path(("file_mounts", remote)), f"{local} does not exist on this machine; `ray "
                                    f"up` would stop when it syncs it; {fix}", error=False))
    return findings + _placeholders(cfg, "`ray up`")


def _install_rules(cfg: dict[str, Any]) -> list[Finding]:
    """Shipyard installed on the head and on every worker type, from a copy of the project that gets there."""
    common = _commands(cfg, "setup_commands")
    head = common + _commands(cfg, "head_setup_commands")
    workers = {"worker_setup_commands": common + _commands(cfg, "worker_setup_commands")}
    for name, node_type in _mapping(cfg, "available_node_types").items():
        # A node type's own worker_setup_commands replace setup_commands + worker_setup_commands for that type.
        if isinstance(node_type, dict) and name != cfg.get("head_node_type") and "worker_setup_commands" in node_type:
            workers[_path(("available_node_types", name, "worker_setup_commands"))] = \
                [c for c in node_type["worker_setup_commands"] if isinstance(c, str)]
    fix = "add `cd ~/shipyard && make install` (as the README installs it)"
    missing = [k for k, cmds in [("head_setup_commands", head), *workers.items()]
               if not any(map(INSTALL.search, cmds))]
    if len(missing) == 1 + len(workers):
        return [Finding("setup_commands", "no command installs Shipyard on the nodes, so trials, training workers "
                                          f"and Serve replicas there cannot import it; {fix} to setup_commands (or "
                                          "to both head_setup_commands and worker_setup_commands)")]
    findings = [Finding(k, f"no command installs Shipyard on these nodes; {fix} here or to setup_commands")
                for k in missing]
    mounts = [str(r).rstrip("/") for r in _mapping(cfg, "file_mounts")]
    every = head + sum(workers.values(), [])
    cloned = any("git clone" in c for c in every)
    for cmd in dict.fromkeys(c for c in every if INSTALL.search(c)):  # each once, in file order
        if not (cloned or "git+" in cmd or any(m and m in cmd for m in mounts)
                or re.search(r"pip3?\s+install\s+(?:-\S+\s+)*['\"]?shipyard\b", cmd)):
            findings.append(Finding("file_mounts", f"nothing brings the project to the nodes for `{cmd}`; add "
                                                   "`~/shipyard: .` (and run `ray up` from the repo root) or a "
                                                   "`git clone` before it"))
    return findings


# ---------------------------------------------------------------------------------------------------------------
# KubeRay manifests


def check_kuberay(doc: dict[str, Any], allow_public: bool = False) -> list[Finding]:
    import ray

    kind, spec = doc.get("kind"), doc.get("spec")
    if kind not in KUBERAY_KINDS:
        return [Finding("kind", f"{kind!r}: Shipyard has rules for {', '.join(KUBERAY_KINDS)} only; nothing "
                                "else checked", error=False)]
    if not isinstance(spec, dict):
        return [Finding("spec", f"missing; a {kind} needs a `spec:` mapping")]
    # serveConfigV2 is YAML in a string: _serve_config parses it and names the key inside it.
    outside_serve = {k: v for k, v in doc.items() if k != "spec"} | {"spec": {k: v for k, v in spec.items()
                                                                              if k != "serveConfigV2"}}
    findings = _auth_disabled(doc) + _public_binds(outside_serve, allow_public)
    cluster_at = ("spec",) if kind == "RayCluster" else ("spec", "rayClusterConfig")
    cluster = spec if kind == "RayCluster" else spec.get("rayClusterConfig")
    if not isinstance(cluster, dict):
        if kind == "RayJob" and spec.get("clusterSelector"):
            return findings + [Finding("spec.clusterSelector", "the job runs on an existing RayCluster; check that "
                                                               "cluster's manifest for auth and binds", error=False)]
        return findings + [Finding(_path(cluster_at), "missing; the Ray cluster's spec goes here")]
    auth = cluster.get("authOptions")
    if not isinstance(auth, dict) or auth.get("mode") != "token":
        findings.append(Finding(_path(cluster_at + ("authOptions",)),
                                ("missing" if not isinstance(auth, dict) else f"mode is {auth.get('mode')!r}")
                                + ": Ray token authentication is off, so anyone who reaches the pods' ports can run "
                                "code; set `authOptions: {mode: token, secretName: <Secret with key auth_token>}` "
                                "(KubeRay >= 1.5.1; without secretName the operator generates the token)"))
    version = cluster.get("rayVersion")
    if str(version) != ray.__version__:
        findings.append(Finding(_path(cluster_at + ("rayVersion",)),
                                f"{'missing' if version is None else repr(version)}, but Shipyard runs Ray "
                                f"{ray.__version__}; set `rayVersion: \"{ray.__version__}\"` and images "
                                f"rayproject/ray:{ray.__version__}-py311-cpu (or -gpu)"))
    for parts, image in _strings(cluster, cluster_at):
        if parts[-1] == "image" and re.match(r"(docker\.io/)?rayproject/ray(-ml)?:", image):
            tag = image.split(":", 1)[1]
            if not tag.startswith(f"{ray.__version__}"):
                findings.append(Finding(_path(parts), f"{image} does not run Ray {ray.__version__}; use "
                                        f"rayproject/ray:{ray.__version__}-py311-cpu (or -gpu)"))
    head_params = (cluster.get("headGroupSpec") or {}).get("rayStartParams") or {}
    if "dashboard-host" not in head_params:
        # A RayJob's submitter pod reaches the dashboard through the head Service: there the exposure is the price.
        fix = ("a RayJob's submitter needs it on the pod network, so pass --allow-public if that is meant"
               if kind == "RayJob" else "set it to \"127.0.0.1\" and reach it with `kubectl port-forward`")
        findings.append(Finding(_path(cluster_at + ("headGroupSpec", "rayStartParams", "dashboard-host")),
                                f"not set, and KubeRay then starts the dashboard on 0.0.0.0; {fix}"
                                + (" (allowed by --allow-public)" if allow_public else ""), error=not allow_public))
    if "serveConfigV2" in spec:
        findings += _serve_config(spec["serveConfigV2"], ("spec", "serveConfigV2"), allow_public)
    return findings + _placeholders(doc, "`kubectl apply`")


def _serve_config(text: Any, parts: Parts, allow_public: bool) -> list[Finding]:
    from pydantic import ValidationError

    with warnings.catch_warnings():  # Ray Serve's own pydantic deprecations, printed when it is imported
        warnings.simplefilter("ignore", DeprecationWarning)
        from ray.serve.schema import ServeDeploySchema

    try:
        config = yaml.safe_load(text) if isinstance(text, str) else text
    except yaml.YAMLError as err:
        return [Finding(_path(parts), f"not valid YAML: {err}")]
    findings = [Finding(f"{_path(parts)} -> {f.where}", f.message, f.error)
                for f in _public_binds(config, allow_public)]
    try:
        ServeDeploySchema.model_validate(config)
    except ValidationError as err:
        findings += [Finding(f"{_path(parts)} -> {_path(e['loc'])}", f"{e['msg']} (Ray Serve's ServeDeploySchema)")
                     for e in err.errors()]
    return findings


# ---------------------------------------------------------------------------------------------------------------
# Rules shared by both kinds, and small helpers


def _auth_disabled(node: Any) -> list[Finding]:
    fix = ("turns Ray token authentication off, so anyone who reaches the cluster's ports can run code on it; "
           "remove it (RAY_AUTH_MODE=token)")
    found = [Finding(_path(p), f"RAY_AUTH_MODE=disabled {fix}") for p, s in _strings(node)
             if AUTH_DISABLED.search(s)]
    found += [Finding(_path(p), f"RAY_AUTH_MODE: disabled {fix}") for p, v in _walk(node)
              if isinstance(v, dict) and v.get("name") == "RAY_AUTH_MODE" and v.get("value") == "disabled"]
    return found


def _placeholders(node: Any, before: str) -> list[Finding]:
    return [Finding(_path(p), f"{token} is a placeholder; replace {token} before {before}", error=False)
            for p, s in _strings(node) for token in PLACEHOLDER.findall(s)]


def _public_binds(node: Any, allow_public: bool) -> list[Finding]:
    findings = []
    for parts, text in _strings(node):
        if ALL_INTERFACES.search(text):
            what = "opens to any address" if re.search(r"(0\.0\.0\.0|::)/0", text) else "listens on all interfaces"
            findings.append(Finding(_path(parts), f"{what} ({_excerpt(text)}); allowed by --allow-public"
                                    if allow_public else f"{what} ({_excerpt(text)}): anyone on the network reaches "
                                    "it; bind 127.0.0.1 (reach it through an SSH tunnel or kubectl port-forward), or "
                                    "pass --allow-public if that is meant", error=not allow_public))
    return findings


def _excerpt(text: str) -> str:
    """The flag that binds: `--dashboard-host=0.0.0.0`, `--host 0.0.0.0`, or the value alone."""
    words = text.split()
    i = next(i for i, w in enumerate(words) if ALL_INTERFACES.search(w))
    flag_before = i and words[i - 1].startswith("-") and not words[i].startswith("-")
    return " ".join(words[i - 1:i + 1]) if flag_before else words[i]


def _walk(node: Any, parts: Parts = ()) -> Iterator[tuple[Parts, Any]]:
    yield parts, node
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk(v, parts + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, parts + (i,))


def _strings(node: Any, parts: Parts = ()) -> Iterator[tuple[Parts, str]]:
    return ((p, v) for p, v in _walk(node, parts) if isinstance(v, str))


def _path(parts: Parts) -> str:
    """('file_mounts', '~/x') -> file_mounts['~/x']; ('setup_commands', 0) -> setup_commands[0]."""
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        elif re.fullmatch(r"[A-Za-z_][\w-]*", str(p)):
            out += f".{p}" if out else str(p)
        else:
            out += f"[{str(p)!r}]" if out else str(p)
    return out


@contextlib.contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    """Ray's INFO lines ("setting max workers for head node type to 0") are not findings."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def _commands(cfg: dict[str, Any], key: str) -> list[str]:
    value = cfg.get(key)
    return [c for c in value if isinstance(c, str)] if isinstance(value, list) else []


def _mapping(cfg: dict[str, Any], key: str) -> dict[Any, Any]:
    value = cfg.get(key)
    return value if isinstance(value, dict) else {}
