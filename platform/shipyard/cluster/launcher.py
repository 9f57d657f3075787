"""Launcher files (`provider:`): `ray up`'s pure pre-flight steps, run offline, and Shipyard's rules
for them (Shipyard installed on every node, token auth, binds), with the reader of shell steps."""

from __future__ import annotations

import contextlib
import copy
import difflib
import io
import json
import os
import posixpath
import re
import reprlib
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from shipyard.cluster.check import Finding
from shipyard.cluster.rules import (
    _auth_disabled,
    _commands,
    _dashboard_bind,
    _mapping,
    _path,
    _placeholders,
    _public_binds,
    _ray_log,
)

# Options of `pip install` / `git clone` that take a value: the word after them is not a path or URL.
VALUE_OPTIONS = {
    "-r",
    "--requirement",
    "-c",
    "--constraint",
    "-i",
    "--index-url",
    "--extra-index-url",
    "-f",
    "--find-links",
    "-t",
    "--target",
    "--prefix",
    "--root",
    "-b",
    "--branch",
    "--depth",
    "--filter",
}
RAY_START = re.compile(r"(?:^|(?<=[\s;&|(/]))ray\s+start\b")
# `RAY_AUTH_MODE=token [X=1 ...] ray start` (the text before `ray start`), or exported earlier in the command
TOKEN_INLINE = re.compile(r"RAY_AUTH_MODE=['\"]?token['\"]?\s+(?:\w+=\S*\s+)*$")
TOKEN_EXPORT = re.compile(r"\bexport\s+(?:\w+=\S*\s+)*RAY_AUTH_MODE=['\"]?token\b")
DASHBOARD_HOST = re.compile(r"--dashboard-host(?:=|\s+)(?:'([^']*)'|\"([^\"]*)\"|([^\s'\";&|]*))")
# Providers whose node resources `ray up` looks up from the cloud when a node type leaves them out.
RESOURCES_AUTOFILLED = {"aws"}
# JSON schema types, as the fix for "... is not of type ...": what it is, and an example value
JSON_TYPES = {
    "integer": ("an integer", "2"),
    "number": ("a number", "0.5"),
    "string": ("a string", '"..."'),
    "boolean": ("true or false", "true"),
    "array": ("a list", "[...]"),
    "object": ("a mapping", "{...}"),
}


# ---------------------------------------------------------------------------------------------------------------
# Launcher files: Ray's pre-flight, offline


def check_launcher(cfg: dict[str, Any], allow_public: bool = False) -> list[Finding]:
    from shipyard.private_apis import launcher_default_config, launcher_provider_types

    provider = cfg.get("provider")
    if not isinstance(provider, dict) or not isinstance(provider.get("type"), str):
        return [
            Finding(
                "provider",
                "missing, or without `type`; a Ray cluster launcher file needs e.g. "
                "`provider: {type: local, head_ip: ..., worker_ips: [...]}` or "
                "`provider: {type: aws, region: us-west-2}`",
            )
        ]
    ptype, known = provider["type"], sorted({*launcher_provider_types(), "external"})
    if ptype == "kuberay":
        return [
            Finding(
                "provider.type",
                "`kuberay` is the provider KubeRay's autoscaler writes for itself; for "
                "Kubernetes write a RayCluster manifest (platform/kuberay/raycluster.yaml)",
            )
        ]
    if ptype not in known:
        public = [k for k in known if not k.startswith("fake_") and k != "readonly"]  # Ray's test providers
        hint = difflib.get_close_matches(ptype, public, n=1)
        return [
            Finding(
                "provider.type",
                f"{ptype!r} is not a provider Ray's cluster launcher knows"
                + (f"; did you mean {hint[0]!r}?" if hint else "")
                + f" Providers: {', '.join(public)}",
            )
        ] + _launcher_rules(cfg, allow_public)
    # Ray fills every top-level key the file leaves out from the provider's defaults (fillout_defaults), so
    # Shipyard's rules read the same merged file `ray up` runs: an omitted head_start_ray_commands is Ray's.
    defaults = launcher_default_config(provider)
    merged = {**defaults, **cfg}
    findings = _launcher_rules(merged, allow_public)
    if ptype == "aws" and not _mapping(merged, "docker").get("image"):  # in a container the AMI's Python is unused
        findings += [
            Finding(
                _path(("available_node_types", name, "node_config", "ImageId")),
                "not set, so Ray "
                "launches its default AMI (Deep Learning AMI, Ubuntu 18.04, Python 3.6), where `make "
                "install` fails: Shipyard needs Python >= 3.10; set an Ubuntu 22.04 AMI, e.g. the Deep "
                "Learning Base OSS Nvidia Driver GPU AMI (Ubuntu 22.04), as platform/cluster-aws.yaml "
                "does",
                error=False,
            )
            for name, node in _mapping(merged, "available_node_types").items()
            if isinstance(node, dict)
            and str(_mapping(node, "node_config").get("ImageId") or "").lower() in ("", "latest_dlami")
        ]
    from_ray = {k for k in defaults if k not in cfg}
    findings = [
        Finding(f.where, f"{f.message} (Ray's default for {f.where.split('[')[0]}: the file does not set it)", f.error)
        if re.split(r"[.\[]", f.where)[0] in from_ray
        else f
        for f in findings
    ]
    return _ray_preflight(cfg, ptype) + findings


def _ray_preflight(cfg: dict[str, Any], ptype: str) -> list[Finding]:
    """`ray up`'s pure pre-flight steps (private to Ray: shipyard.private_apis), collecting every schema error."""
    import click
    import jsonschema
    import ray.autoscaler

    from shipyard.private_apis import launcher_prepare_local as prepare_local
    from shipyard.private_apis import launcher_util

    util = launcher_util()

    findings: list[Finding] = []
    staged = copy.deepcopy(cfg)
    if ptype in RESOURCES_AUTOFILLED:  # `ray up` asks the cloud for these; offline they stay empty
        for name, node_type in _mapping(staged, "available_node_types").items():
            if isinstance(node_type, dict) and "resources" not in node_type:
                node_type["resources"] = {}
                findings.append(
                    Finding(
                        _path(("available_node_types", name, "resources")),
                        "not set; `ray up` looks the instance type's CPUs/GPUs up in AWS (not "
                        "done here); declare them, e.g. `resources: {CPU: 4, GPU: 1}`",
                        error=False,
                    )
                )
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    ray_output = io.StringIO()  # Ray's cli_logger prints its warnings, its loggers log theirs: both become findings
    with (
        contextlib.redirect_stdout(ray_output),
        contextlib.redirect_stderr(ray_output),
        _ray_log("ray.autoscaler") as ray_log,
    ):
        if ptype == "local":  # missing head_ip, available_node_types on-prem: ClickException
            try:
                prepare_local(staged)  # for its checks; the result is unused on purpose (prepare_config redoes it)
            except click.ClickException as err:
                findings.append(_local_provider_finding(err.message, cfg))
            except (TypeError, ValueError, KeyError, AttributeError):
                pass  # a value of the wrong type (max_workers: [1]): the schema below names it
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
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line) for line in ray_output.getvalue().splitlines()]
    said = [t.split(" -- ", 1)[-1] for t in lines if " WARN " in t] + [r.getMessage() for r in ray_log]
    return findings + [Finding("", "Ray: " + " ".join(t.split()), error=False) for t in dict.fromkeys(said)]


def _local_provider_finding(message: str, cfg: dict[str, Any]) -> Finding:
    provider = cfg["provider"]
    if "head_ip" in message or "worker_ips" in message:
        key = "head_ip" if "head_ip" not in provider else "worker_ips"
        example = (
            "`head_ip: HEAD_HOST` (the head machine's address)"
            if key == "head_ip"
            else "`worker_ips: [WORKER_HOST_1]` (the workers' addresses)"
        )
        return Finding(
            f"provider.{key}",
            f"missing; the local provider needs {example}, or a `coordinator_address` (Ray: {message})",
        )
    if "available_node_types" in message:
        return Finding(
            "available_node_types",
            "not allowed with `provider.type: local`; remove it and declare "
            "GPUs on `ray start` (--num-gpus=N) in the start commands "
            f"(Ray: {message})",
        )
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
            out.append(
                Finding(
                    _path(parts + (key,)),
                    f"not a field of {owner} ({err.message}); "
                    + (f"did you mean {hint[0]}?" if hint else f"fields: {', '.join(allowed)}"),
                )
            )
        return out
    if err.validator == "required":
        missing = re.match(r"'(.+?)' is a required property", err.message)
        return [Finding(_path(parts + ((missing.group(1),) if missing else ())), f"missing ({err.message})")]
    description = err.schema.get("description")
    message = err.message.replace(repr(err.instance), reprlib.repr(err.instance), 1)  # not a whole node type
    message += f" ({description})" if description else ""
    expected = [err.validator_value] if isinstance(err.validator_value, str) else err.validator_value
    if err.validator == "type" and (types := [t for t in expected if t in JSON_TYPES]):
        # 'one' is not of type 'integer' -> expected an integer, e.g. `GPU: 2`
        example = json.dumps(err.schema["default"]) if "default" in err.schema else JSON_TYPES[types[0]][1]
        key = f"{parts[-1]}: " if parts and isinstance(parts[-1], str) else "- " if parts else ""
        message += f"; expected {' or '.join(JSON_TYPES[t][0] for t in types)}, e.g. `{key}{example}`"
    return [Finding(_path(parts) or "(top level)", message)]


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
                before = re.sub(r"\S*$", "", cmd[: m.start()])  # drop a path before `ray`: ~/x/.venv/bin/ray
                if not (TOKEN_INLINE.search(before) or TOKEN_EXPORT.search(before)):
                    findings.append(
                        Finding(
                            f"{key}[{i}]",
                            "`ray start` without RAY_AUTH_MODE=token: it turns token "
                            "auth on only where a token already exists, and a worker started "
                            "without it cannot join a head that has it; write "
                            "`RAY_AUTH_MODE=token ray start ...`",
                        )
                    )
            if key.startswith("head") and (host := DASHBOARD_HOST.search(cmd)):
                findings += _dashboard_bind(
                    f"{key}[{i}]",
                    "".join(g or "" for g in host.groups()),
                    allow_public,
                    "`ray dashboard <cluster file>` (an SSH tunnel)",
                )
        if not starts:
            findings.append(Finding(key, "no `ray start`: these nodes would not join the cluster"))
    token_mounted = any(str(remote).rstrip("/").endswith("auth_token") for remote in _mapping(cfg, "file_mounts"))
    token_in_env = any(
        "RAY_AUTH_TOKEN" in c
        for k in ("head_start_ray_commands", "worker_start_ray_commands")
        for c in _commands(cfg, k)
    )
    if not (token_mounted or token_in_env):
        findings.append(
            Finding(
                "file_mounts",
                "no Ray auth token reaches the nodes: with RAY_AUTH_MODE=token "
                "`ray start` fails without one, and every node needs the same token. Run `ray "
                "get-auth-token --generate` here and add `~/.ray/auth_token: ~/.ray/auth_token`",
            )
        )
    for remote, local in _mapping(cfg, "file_mounts").items():
        source = Path(os.path.expanduser(str(local)))  # relative to the cwd, as `ray up` reads it
        if not source.exists():
            fix = (
                "run `ray get-auth-token --generate` first"
                if str(remote).endswith("auth_token")
                else "run `ray up` from the directory it is relative to"
            )
            findings.append(
                Finding(
                    _path(("file_mounts", remote)),
                    f"{local} does not exist on this machine; `ray up` would stop when it syncs it; {fix}",
                    error=False,
                )
            )
    return findings + _placeholders(cfg, "`ray up`")


def _install_rules(cfg: dict[str, Any]) -> list[Finding]:
    """Shipyard installed on the head and on every worker type, from a copy of the project that gets there."""
    common = _commands(cfg, "setup_commands")
    head = common + _commands(cfg, "head_setup_commands")
    workers = {"worker_setup_commands": common + _commands(cfg, "worker_setup_commands")}
    for name, node_type in _mapping(cfg, "available_node_types").items():
        # A node type's own worker_setup_commands replace setup_commands + worker_setup_commands for that type.
        if isinstance(node_type, dict) and name != cfg.get("head_node_type") and "worker_setup_commands" in node_type:
            workers[_path(("available_node_types", name, "worker_setup_commands"))] = [
                c for c in node_type["worker_setup_commands"] if isinstance(c, str)
            ]
    fix = "add `cd ~/shipyard && make install` (as the README installs it)"
    steps = {c: list(_shell_steps(c)) for c in head + sum(workers.values(), [])}  # each command once, in order
    missing = [
        k
        for k, cmds in [("head_setup_commands", head), *workers.items()]
        if not any(what == "install" for c in cmds for what, _ in steps[c])
    ]
    if len(missing) == 1 + len(workers):
        return [
            Finding(
                "setup_commands",
                "no command installs Shipyard on the nodes, so trials, training workers "
                f"and Serve replicas there cannot import it; {fix} to setup_commands (or "
                "to both head_setup_commands and worker_setup_commands)",
            )
        ]
    findings = [
        Finding(k, f"no command installs Shipyard on these nodes; {fix} here or to setup_commands") for k in missing
    ]
    # Where the project is on the nodes: file_mounts targets and `git clone` directories (URLs need neither).
    there = {posixpath.normpath(str(r)) for r in _mapping(cfg, "file_mounts")} | {
        where for found in steps.values() for what, where in found if what == "clone"
    }
    for cmd, cmd_steps in steps.items():
        for src in [where for what, where in cmd_steps if what == "install" and "://" not in where]:
            if not any(src == p or src.startswith(p.rstrip("/") + "/") for p in there):
                findings.append(
                    Finding(
                        "file_mounts",
                        f"nothing brings the project to the nodes for `{cmd}`: it "
                        f"installs from {src}, which no file_mounts target or `git clone` fills; add "
                        "`~/shipyard: .` (and run `ray up` from the repo root) or a `git clone` of "
                        "the project before it",
                    )
                )
    return findings


def _shell_steps(cmd: str, env: dict[str, str] | None = None) -> Iterator[tuple[str, str]]:
    """("install", where from) for each install of Shipyard in a shell command, ("clone", directory) for each `git
    clone`. Installs: `make install` in a directory (`cd DIR && make install`, `make -C DIR install`),
    `DIR/scripts/install.sh`, `pip install` of a path (`-e .`, `DIR`) or of a URL naming shipyard (archive, git+).
    Not `pip install shipyard`: that name on PyPI is not this project."""
    env, cwd = {"HOME": "~", **(env or {})}, "~"  # Ray runs each command in the home directory

    def at(path: str) -> str:
        return path if "://" in path else posixpath.normpath(path if path[:1] in ("/", "~", "$") else f"{cwd}/{path}")

    for segment in re.split(r"&&|\|\||[;|\n]", cmd):
        try:
            words = shlex.split(segment)
        except ValueError:  # a quote that the split above cut
            words = segment.split()
        words = [re.sub(r"\$\{?(\w+)\}?", lambda m: env.get(m.group(1), m.group(0)), w) for w in words]
        for i, word in enumerate(words):
            name, rest = posixpath.basename(word), words[i + 1 :]
            args = [a for prev, a in zip(["", *rest], rest) if not a.startswith("-") and prev not in VALUE_OPTIONS]
            if name == "cd":
                cwd = at(rest[0] if rest else "~")
            elif name == "make" and "install" in rest:
                yield "install", at(rest[rest.index("-C") + 1] if "-C" in rest[:-1] else ".")
            elif word.endswith("scripts/install.sh"):
                yield "install", at(word.removesuffix("scripts/install.sh") or ".")
            elif name in ("pip", "pip3") and rest[:1] == ["install"]:
                for arg in (re.sub(r"\[[\w,-]*\]$", "", a) for a in args[1:]):  # `.[dev]` is `.`
                    if "shipyard" in arg.lower() if "://" in arg else arg.startswith((".", "/", "~")) or "/" in arg:
                        yield "install", at(arg)
            elif name == "git" and rest[:1] == ["clone"] and len(args) > 1:
                yield "clone", at(args[2] if len(args) > 2 else posixpath.basename(args[1]).removesuffix(".git"))
            else:
                continue
            break  # one command per segment: `sudo make install`, `bash -c "cd DIR"`
