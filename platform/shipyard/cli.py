"""The `shipyard` command (also `python -m shipyard`).

shipyard run pipelines/configs/digits.yaml train.lr=0.01 tune.num_samples=4 --summary-json out.json
shipyard promote digits 3        # champion -> v3, by hand
shipyard rollback digits         # champion -> the one before
shipyard cluster check platform/cluster-aws.yaml   # a Ray cluster file, offline, before `ray up`
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from pathlib import Path
from typing import Any

from shipyard.errors import PlatformError
from shipyard.report import format_summary

log = logging.getLogger("shipyard")


def _add_run_args(p: argparse.ArgumentParser, config_required: bool) -> None:
    if config_required:
        p.add_argument("config", help="YAML config file, e.g. pipelines/configs/digits.yaml")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="config overrides with the YAML's dotted keys, e.g. train.lr=0.01 tune.num_samples=4",
    )
    p.add_argument(
        "--address", default=None, help="Ray cluster to attach to (default: $RAY_ADDRESS, else start a local Ray)"
    )
    p.add_argument(
        "--summary-json", type=Path, default=None, metavar="PATH", help="also write the closing summary as JSON to PATH"
    )
    p.add_argument(
        "--keep-serving",
        action="store_true",
        help="leave the endpoint running after the check (same as serve.keep_running=true)",
    )
    p.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default=None,
        metavar="RUN_NAME",
        help="continue an unfinished pipeline run (default: the newest of this pipeline), e.g. after "
        "the driver died mid-search: finished trials are kept, the others restart from their "
        "latest checkpoint",
    )


def configure_logging() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    for noisy in ("ray.data", "ray.tune", "ray.train", "ray.serve", "mlflow", "alembic", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run_pipeline(
    config_path: str | Path | None,
    overrides: list[str],
    address: str | None = None,
    summary_json: Path | None = None,
    keep_serving: bool = False,
    resume: str | None = None,
) -> dict[str, Any]:
    """Load the config (fails before Ray on a bad key), run the pipeline, print and write the summary."""
    from shipyard.config import load_config, parse_overrides
    from shipyard.pipeline import run
    from shipyard.startup import configure_process

    cfg = load_config(config_path, parse_overrides(overrides))
    configure_process(fast_ingress=cfg.serve.enabled and cfg.serve.fast_ingress, address=address)
    log.info("config:\n%s", cfg.to_yaml())

    def report(summary: dict[str, Any]) -> None:  # called before an endpoint kept up waits for Ctrl-C
        if summary.get("endpoint_example"):
            print(
                "endpoint answer to POST /predict with 3 test rows:",
                json.dumps(summary["endpoint_example"]["response"]),
            )
        print(format_summary(summary))
        if summary_json:
            summary_json.parent.mkdir(parents=True, exist_ok=True)
            summary_json.write_text(json.dumps(summary, indent=2, default=str))
            print(f"summary written to {summary_json}")

    return run(cfg, address=address, keep_serving=keep_serving or None, report=report, resume=resume)


def pipeline_main(default_config: Path, argv: list[str] | None = None, description: str = "") -> int:
    """Entry of `python -m pipelines.<name> [config.yaml] [key=value ...]`."""
    p = argparse.ArgumentParser(description=description)
    _add_run_args(p, config_required=False)
    args = _resume_is_not_an_override(p.parse_args(argv))
    config = default_config
    if args.overrides and "=" not in args.overrides[0]:
        config, args.overrides = Path(args.overrides[0]), args.overrides[1:]
    return _guard(
        lambda: run_pipeline(config, args.overrides, args.address, args.summary_json, args.keep_serving, args.resume)
    )


def _resume_is_not_an_override(args: argparse.Namespace) -> argparse.Namespace:
    """`--resume train.lr=0.01` or `--resume my.yaml`: argparse takes the argument for the optional run name;
    give it back (a config file goes first, where `pipeline_main` looks for it)."""
    if getattr(args, "resume", None) is None:
        return args
    if "=" in args.resume:
        args.overrides.append(args.resume)
        args.resume = "latest"
    elif args.resume.endswith((".yaml", ".yml")):
        args.overrides.insert(0, args.resume)
        args.resume = "latest"
    return args


def _guard(fn) -> int:
    configure_logging()
    try:
        fn()
    except PlatformError as err:
        log.error("%s", err)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="shipyard", description="Shipyard: from data to a live endpoint on Ray.")
    sub = p.add_subparsers(dest="command", required=True)
    run_p = sub.add_parser(
        "run",
        help="run a pipeline from a YAML config",
        description="Run data -> tune -> train -> register -> serve from a YAML config.",
    )
    _add_run_args(run_p, config_required=True)
    promote_p = sub.add_parser(
        "promote",
        help="point a model's champion alias at a version",
        description="Move `champion` to VERSION by hand (no accuracy gate); a running "
        "endpoint on models:/NAME@champion swaps to it in place.",
    )
    promote_p.add_argument("name", help="registered model name, e.g. digits")
    promote_p.add_argument("version", help="version number to make champion")
    rollback_p = sub.add_parser(
        "rollback",
        help="put the previous champion back",
        description="Move `champion` back to the version it pointed at before.",
    )
    rollback_p.add_argument("name", help="registered model name, e.g. digits")
    for q in (promote_p, rollback_p):
        q.add_argument(
            "--tracking-uri",
            default=None,
            help="MLflow tracking/registry URI (default: $MLFLOW_TRACKING_URI, else the project's "
            "sqlite file, as the pipeline uses)",
        )
    plan_p = sub.add_parser(
        "plan",
        help="predict step time, scaling and search time before running",
        description="Price a pipeline config on this machine (the profile `shipyard "
        "calibrate` wrote) or on catalog hardware, without starting Ray: top layers "
        "by time, step and epoch time, strong and weak scaling, a worker count, the "
        "search's wall time, and a PNG of the scaling curve.",
    )
    plan_p.add_argument("config", help="YAML config file, e.g. pipelines/configs/digits.yaml")
    plan_p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.batch_size=256")
    plan_p.add_argument(
        "--hardware", default="local", help="local (the calibrated profile) or a catalog device: a100, h100, h200"
    )
    plan_p.add_argument("--nodes", default="1", help="node count or range, e.g. 4 or 1..8")
    plan_p.add_argument(
        "--gpus-per-node",
        type=int,
        default=None,
        help="workers per node (default: 8 for catalog GPUs, cores / scaling.cpus_per_worker locally)",
    )
    plan_p.add_argument(
        "--interconnect",
        default=None,
        help="network between nodes for catalog hardware: ib-200, ib-400, eth-100, eth-25 "
        "(inside a node: the GPU's NVLink)",
    )
    plan_p.add_argument(
        "--algorithm",
        default="ring",
        choices=["ring", "tree", "ps"],
        help="gradient all-reduce: ring (DDP's NCCL/gloo default), tree, ps (one parameter server)",
    )
    plan_p.add_argument(
        "--dtype",
        default="fp32",
        choices=["fp32", "tf32", "bf16"],
        help="matmul precision on catalog GPUs (Shipyard trains in fp32)",
    )
    plan_p.add_argument("--profile", type=Path, default=None, help="hardware profile (default: plan.profile)")
    plan_p.add_argument(
        "--measure",
        action="store_true",
        help="run a few real training steps of the model here first (a few seconds, no Ray) and price every "
        "configuration from them, op by op, instead of from the profile alone",
    )
    plan_p.add_argument(
        "--plot",
        type=Path,
        default=Path(".shipyard/plan.png"),
        metavar="PNG",
        help="where to write the scaling curve (default: .shipyard/plan.png)",
    )
    cal_p = sub.add_parser(
        "calibrate",
        help="measure this machine (every Ray node) for shipyard plan",
        description="Measure compute per op class and the per-op overhead on every Ray node "
        "(a Ray task each), and gloo all-reduce between two Ray workers; write the "
        "hardware profile that `shipyard plan` and the pipeline read.",
    )
    cal_p.add_argument(
        "--address", default=None, help="Ray cluster to measure (default: $RAY_ADDRESS, else a local Ray started here)"
    )
    cal_p.add_argument(
        "--out", type=Path, default=None, help="profile path (default: plan.profile, .shipyard/hardware.json)"
    )
    cal_p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per worker to measure with (= scaling.cpus_per_worker; default 1)",
    )
    sub.add_parser(
        "fast-ingress-env",
        help="print the environment for `ray start` with Serve's fast ingress",
        description="Print `export KEY=VALUE` lines that turn on Serve's HAProxy ingress (stats and "
        "metrics on loopback) for a Ray started after them: "
        'eval "$(shipyard fast-ingress-env)" && ray start ...',
    )
    cluster_p = sub.add_parser(
        "cluster",
        help="check a Ray cluster file before `ray up` / `kubectl apply`",
        description="Cluster files: Ray launcher files (cluster.yaml, "
        "platform/cluster-aws.yaml) and KubeRay manifests (platform/kuberay/).",
    )
    check_p = cluster_p.add_subparsers(dest="cluster_command", required=True).add_parser(
        "check",
        help="validate a cluster file offline: Ray's schema and Shipyard's rules",
        description="Validate a Ray launcher file against the schema inside Ray (ray up's pre-flight, without a "
        "provider's cloud calls) or a KubeRay manifest, plus Shipyard's rules: the project installed on "
        "every node, token auth on, nothing on 0.0.0.0. Starts nothing, no SSH. Exit 0: ok; 2: problems.",
    )
    check_p.add_argument(
        "file",
        nargs="?",
        default="cluster.yaml",
        type=Path,
        help="launcher file or KubeRay manifest (default: cluster.yaml)",
    )
    check_p.add_argument(
        "--allow-public",
        action="store_true",
        help="binding 0.0.0.0 / :: (all interfaces) is meant: a warning, not an error",
    )
    args = _resume_is_not_an_override(p.parse_args(argv))
    if args.command == "cluster":
        return cluster_check_command(args.file, args.allow_public)
    if args.command == "fast-ingress-env":
        from shipyard.serve.ingress import fast_ingress_env

        print("\n".join(f"export {k}={shlex.quote(v)}" for k, v in fast_ingress_env(free_ports=False).items()))
        return 0
    if args.command == "plan":
        return _guard(lambda: plan_command(args))
    if args.command == "calibrate":
        return _guard(lambda: calibrate_command(args))
    if args.command == "run":
        return _guard(
            lambda: run_pipeline(
                args.config, args.overrides, args.address, args.summary_json, args.keep_serving, args.resume
            )
        )
    return _guard(lambda: move_champion(args))


def cluster_check_command(path: Path, allow_public: bool = False) -> int:
    """`shipyard cluster check`: one "ok" line (and its warnings) and 0, or every problem and 2."""
    from shipyard.cluster.check import check_file

    try:
        result = check_file(path, allow_public=allow_public)
    except Exception as err:  # a shape of file the rules did not foresee: say so, without a traceback
        print(
            f"cannot check {path}: {type(err).__name__}: {err}; is a list or a value where a mapping belongs (or "
            "the reverse)? Compare the file with cluster.yaml or platform/kuberay/raycluster.yaml, and report "
            "it as a Shipyard bug if it is right",
            file=sys.stderr,
        )
        return 2
    checked = f"{result.kind}: {result.checked}" if result.checked else result.kind
    warnings = [f"  warning: {w}" for w in result.warnings]
    if result.ok:
        counted = f", {len(warnings)} warning(s)" if warnings else ""
        print("\n".join([f"{path}: ok ({checked}{counted})", *warnings]))
        return 0
    errors = [f"  error: {e}" for e in result.errors]
    print("\n".join([f"{path}: {len(errors)} problem(s) ({checked})", *errors, *warnings]), file=sys.stderr)
    return 2


def plan_command(args: argparse.Namespace) -> None:
    import time

    from shipyard.config import load_config, parse_overrides
    from shipyard.perf.plan import make_plan
    from shipyard.perf.report import format_plan, plot_scaling

    started = time.perf_counter()
    cfg = load_config(args.config, parse_overrides(args.overrides))
    try:
        plan = make_plan(
            cfg,
            args.hardware,
            args.nodes,
            args.gpus_per_node,
            args.interconnect,
            args.profile,
            args.algorithm,
            args.dtype,
            measure=args.measure,
        )
    except (KeyError, FileNotFoundError, ValueError) as err:
        raise PlatformError(str(err).strip("'\"")) from None
    print(format_plan(plan, cfg))
    out = plot_scaling(plan, args.plot)
    print(f"scaling curve written to {out} ({time.perf_counter() - started:.1f} s, no Ray started)")


def calibrate_command(args: argparse.Namespace) -> None:
    from shipyard.cluster.attach import init_ray
    from shipyard.config import load_config
    from shipyard.perf.calibration import calibrate
    from shipyard.perf.plan import default_profile_path
    from shipyard.startup import configure_process

    configure_process(fast_ingress=False, address=args.address)
    out = args.out or default_profile_path(load_config(None, {}))
    started = init_ray(args.address)
    import ray

    try:
        profile = calibrate(out, threads=args.threads)
    finally:
        if started:
            ray.shutdown()
    d, link = profile.device, profile.interconnect
    print(
        f"{out}: {len(profile.nodes)} node(s); slowest {d.name}: matmul up to {d.peak_tflops['fp32'] * 1e3:.1f} "
        f"GFLOP/s, element-wise {d.mem_bandwidth_gbps:.1f} GB/s at 100 MB, {d.op_overhead_us:.2f} us per op "
        f"({d.threads} thread(s)); all-reduce {link.name}: {link.latency_us:.1f} us + bytes / "
        f"{link.bandwidth_gbps:.2f} GB/s"
    )


def move_champion(args: argparse.Namespace) -> None:
    import os

    import mlflow

    from shipyard.config import load_config
    from shipyard.track import registry

    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or load_config(None, {}).tracking_uri
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        if args.command == "promote":
            before = registry.set_champion(args.name, args.version, "promoted by hand (shipyard promote)")
            moved = (before, args.version)
        else:
            moved = registry.rollback(args.name)
    except mlflow.exceptions.MlflowException as err:
        raise PlatformError(f"{args.command} {args.name}: {err.message} (registry {uri})") from None
    print(
        f"{args.name}: champion v{moved[0]} -> v{moved[1]}; endpoints serving models:/{args.name}@champion "
        "swap to it in place within their refresh_s (default 2 s)"
    )


if __name__ == "__main__":
    sys.exit(main())
