"""Rules shared by launcher files and KubeRay manifests (auth off, public binds, the dashboard's host,
placeholders) and the small helpers both kinds use: walking a file, key paths, Ray's log."""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator
from typing import Any

from shipyard.cluster.check import Finding

Parts = tuple[Any, ...]

AUTH_DISABLED = re.compile(r"RAY_AUTH_MODE\s*=\s*['\"]?disabled")
ALL_INTERFACES = re.compile(r"(?<![\w.:])0\.0\.0\.0(?![\d.])|(?<![\w:])(?:\[::\]|::)(?![\w:])")
LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}
# Placeholders the shipped files use; `$RAY_HEAD_IP`-style shell variables are not placeholders.
PLACEHOLDER = re.compile(r"(?<![$\w{])(HEAD_HOST|WORKER_HOST_\d+|YOUR_[A-Z0-9_]+)\b")


# ---------------------------------------------------------------------------------------------------------------
# Rules shared by both kinds, and small helpers


def _auth_disabled(node: Any) -> list[Finding]:
    fix = (
        "turns Ray token authentication off, so anyone who reaches the cluster's ports can run code on it; "
        "remove it (RAY_AUTH_MODE=token)"
    )
    found = [Finding(_path(p), f"RAY_AUTH_MODE=disabled {fix}") for p, s in _strings(node) if AUTH_DISABLED.search(s)]
    found += [
        Finding(_path(p), f"RAY_AUTH_MODE: disabled {fix}")
        for p, v in _walk(node)
        if isinstance(v, dict) and v.get("name") == "RAY_AUTH_MODE" and v.get("value") == "disabled"
    ]
    return found


def _dashboard_bind(where: str, host: str, allow_public: bool, tunnel: str) -> list[Finding]:
    """The dashboard on loopback; 0.0.0.0 and :: are _public_binds' findings, an empty host is all interfaces too."""
    if host in LOOPBACK or ALL_INTERFACES.search(host):
        return []
    what = "all interfaces (an empty host)" if not host.strip() else f"{host}, reachable from the network"
    allowed = " (allowed by --allow-public)" if allow_public else ", or pass --allow-public if that is meant"
    return [
        Finding(
            where,
            f"the dashboard listens on {what}; keep it on 127.0.0.1 and reach it with {tunnel}" + allowed,
            error=not allow_public,
        )
    ]


def _placeholders(node: Any, before: str) -> list[Finding]:
    return [
        Finding(_path(p), f"{token} is a placeholder; replace {token} before {before}", error=False)
        for p, s in _strings(node)
        for token in PLACEHOLDER.findall(s)
    ]


def _public_binds(node: Any, allow_public: bool) -> list[Finding]:
    findings = []
    for parts, text in _strings(node):
        if ALL_INTERFACES.search(text):
            what = "opens to any address" if re.search(r"(0\.0\.0\.0|::)/0", text) else "listens on all interfaces"
            findings.append(
                Finding(
                    _path(parts),
                    f"{what} ({_excerpt(text)}); allowed by --allow-public"
                    if allow_public
                    else f"{what} ({_excerpt(text)}): anyone on the network reaches "
                    "it; bind 127.0.0.1 (reach it through an SSH tunnel or kubectl port-forward), or "
                    "pass --allow-public if that is meant",
                    error=not allow_public,
                )
            )
    return findings


def _excerpt(text: str) -> str:
    """The flag that binds: `--dashboard-host=0.0.0.0`, `--host 0.0.0.0`, or the value alone."""
    words = text.split()
    i = next(i for i, w in enumerate(words) if ALL_INTERFACES.search(w))
    flag_before = i and words[i - 1].startswith("-") and not words[i].startswith("-")
    return " ".join(words[i - 1 : i + 1]) if flag_before else words[i]


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
def _ray_log(logger_name: str) -> Iterator[list[logging.LogRecord]]:
    """The WARNING+ records of Ray's logger (those of `ray up`'s own checks among them), kept from the handler of
    the `ray` logger, which holds the real stderr; INFO ("setting max workers for head node type to 0") is dropped."""
    logger, records, handler = logging.getLogger(logger_name), [], logging.Handler(logging.WARNING)
    handler.emit = records.append  # type: ignore[method-assign]
    saved = logger.level, logger.propagate, logger.handlers
    logger.propagate, logger.handlers = False, [handler]
    logger.setLevel(logging.WARNING)
    try:
        yield records
    finally:
        logger.propagate, logger.handlers = saved[1:]
        logger.setLevel(saved[0])


def _commands(cfg: dict[str, Any], key: str) -> list[str]:
    value = cfg.get(key)
    return [c for c in value if isinstance(c, str)] if isinstance(value, list) else []


def _mapping(cfg: Any, key: str) -> dict[Any, Any]:
    value = cfg.get(key) if isinstance(cfg, dict) else None
    return value if isinstance(value, dict) else {}
