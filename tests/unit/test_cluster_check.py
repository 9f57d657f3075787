"""`shipyard cluster check`: the shipped cluster files pass; broken copies of them fail, naming key and fix.

Broken files are the shipped ones loaded, changed in one place and dumped to tmp_path, so the tests follow the
real files. Nothing starts: no Ray, no SSH, no cloud call.
"""

import copy
import logging
from pathlib import Path

import pytest
import yaml

from shipyard.cli import main

ROOT = Path(__file__).resolve().parents[2]
LOCAL, AWS, KUBERAY = (
    ROOT / "cluster.yaml",
    ROOT / "platform" / "cluster-aws.yaml",
    ROOT / "platform" / "kuberay" / "raycluster.yaml",
)


def shipped(path: Path) -> dict:
    return copy.deepcopy(yaml.safe_load(path.read_text()))


def check(capsys, path: Path, *flags: str) -> tuple[int, str]:
    rc = main(["cluster", "check", str(path), *flags])
    out = capsys.readouterr()
    return rc, out.out + out.err


def check_edited(tmp_path, capsys, cfg_or_text, *flags: str) -> tuple[int, str]:
    path = tmp_path / "cluster.yaml"
    path.write_text(cfg_or_text if isinstance(cfg_or_text, str) else yaml.safe_dump(cfg_or_text, sort_keys=False))
    return check(capsys, path, *flags)


@pytest.mark.parametrize("path", [LOCAL, AWS, KUBERAY], ids=lambda p: p.name)
def test_shipped_cluster_files_pass(capsys, path):
    rc, out = check(capsys, path)
    assert rc == 0, out
    assert out.startswith(f"{path}: ok (")


def test_shipped_local_file_warns_about_its_placeholders(capsys):
    rc, out = check(capsys, LOCAL)
    assert rc == 0
    assert "warning: provider.head_ip: HEAD_HOST is a placeholder; replace HEAD_HOST before `ray up`" in out
    assert "provider.worker_ips[0]: WORKER_HOST_1 is a placeholder" in out


def test_kuberay_output_says_the_crd_schema_is_not_checked(capsys):
    assert "the KubeRay CRD schema itself is not checked" in check(capsys, KUBERAY)[1]


def test_default_file_is_cluster_yaml(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert main(["cluster", "check"]) == 0
    assert capsys.readouterr().out.startswith("cluster.yaml: ok")


def test_aws_file_is_checked_without_touching_aws(capsys, monkeypatch):
    """The AWS provider's bootstrap (boto3: key pairs, subnets, IAM) must not run; Ray's schema still does."""
    from ray.autoscaler._private import providers

    def no_cloud(_config):
        raise AssertionError("the AWS node provider was imported")

    monkeypatch.setitem(providers._NODE_PROVIDERS, "aws", no_cloud)
    assert check(capsys, AWS)[0] == 0


def test_typo_key_names_the_key_and_the_fix(tmp_path, capsys):
    cfg = shipped(LOCAL)
    cfg["max_wrokers"] = cfg.pop("max_workers")
    rc, out = check_edited(tmp_path, capsys, cfg)
    assert rc == 2
    assert (
        "max_wrokers: not a field of a Ray cluster file (Additional properties are not allowed ('max_wrokers' "
        "was unexpected)); did you mean max_workers?"
    ) in out


def test_schema_errors_in_an_aws_node_type(tmp_path, capsys):
    cfg = shipped(AWS)
    cfg["available_node_types"]["gpu_worker"]["resources"]["GPU"] = "one"
    rc, out = check_edited(tmp_path, capsys, cfg)
    assert rc == 2 and "available_node_types.gpu_worker.resources.GPU: 'one' is not of type 'integer'" in out
    assert "expected an integer, e.g. `GPU: 2`" in out


def test_missing_head_ip(tmp_path, capsys):
    cfg = shipped(LOCAL)
    del cfg["provider"]["head_ip"]
    rc, out = check_edited(tmp_path, capsys, cfg)
    assert rc == 2 and "provider.head_ip: missing; the local provider needs `head_ip:" in out


def test_no_install_step(tmp_path, capsys):
    cfg = shipped(LOCAL)
    cfg["setup_commands"] = ["echo nothing installed"]
    rc, out = check_edited(tmp_path, capsys, cfg)
    assert rc == 2
    assert "setup_commands: no command installs Shipyard on the nodes" in out and "make install" in out


def test_install_without_the_project_on_the_nodes(tmp_path, capsys):
    cfg = shipped(AWS)
    del cfg["file_mounts"]["~/shipyard"]
    rc, out = check_edited(tmp_path, capsys, cfg)
    assert rc == 2 and "file_mounts: nothing brings the project to the nodes" in out


def test_auth_mode_disabled(tmp_path, capsys):
    cfg = shipped(LOCAL)
    cfg["worker_start_ray_commands"][1] = cfg["worker_start_ray_commands"][1].replace(
        "RAY_AUTH_MODE=token", "RAY_AUTH_MODE=disabled"
    )
    rc, out = check_edited(tmp_path, capsys, cfg)
    assert rc == 2
    assert "worker_start_ray_commands[1]: RAY_AUTH_MODE=disabled turns Ray token authentication off" in out


def test_ray_start_without_token_mode(tmp_path, capsys):
    cfg = shipped(LOCAL)
    cfg["head_start_ray_commands"][1] = cfg["head_start_ray_commands"][1].replace("RAY_AUTH_MODE=token ", "")
    rc, out = check_edited(tmp_path, capsys, cfg)
    assert rc == 2 and "head_start_ray_commands[1]: `ray start` without RAY_AUTH_MODE=token" in out


def test_token_mode_exported_earlier_in_the_command_counts(tmp_path, capsys):
    cfg = shipped(LOCAL)
    cfg["head_start_ray_commands"][1] = "export RAY_AUTH_MODE=token && " + cfg["head_start_ray_commands"][1].replace(
        "RAY_AUTH_MODE=token ", ""
    )
    assert check_edited(tmp_path, capsys, cfg)[0] == 0


def test_no_token_for_the_nodes(tmp_path, capsys):
    cfg = shipped(LOCAL)
    del cfg["file_mounts"]["~/.ray/auth_token"]
    rc, out = check_edited(tmp_path, capsys, cfg)
    assert rc == 2 and "file_mounts: no Ray auth token reaches the nodes" in out


def test_dashboard_on_all_interfaces_needs_allow_public(tmp_path, capsys):
    cfg = shipped(LOCAL)
    cfg["head_start_ray_commands"][1] = cfg["head_start_ray_commands"][1].replace(
        "--dashboard-host=127.0.0.1", "--dashboard-host=0.0.0.0"
    )
    rc, out = check_edited(tmp_path, capsys, cfg)
    assert rc == 2 and "error: head_start_ray_commands[1]: listens on all interfaces" in out
    rc, out = check_edited(tmp_path, capsys, cfg, "--allow-public")
    assert rc == 0 and "warning: head_start_ray_commands[1]: listens on all interfaces" in out


def test_omitted_start_commands_are_rays_defaults_and_checked(tmp_path, capsys):
    """Ray's AWS default head command has --dashboard-host=0.0.0.0 and no token mode."""
    cfg = shipped(AWS)
    del cfg["head_start_ray_commands"]
    rc, out = check_edited(tmp_path, capsys, cfg)
    assert rc == 2 and "Ray's default for head_start_ray_commands: the file does not set it" in out


def test_every_problem_is_listed(tmp_path, capsys):
    cfg = shipped(LOCAL)
    cfg["max_wrokers"] = cfg.pop("max_workers")
    cfg["setup_commands"] = []
    cfg["worker_start_ray_commands"][1] = cfg["worker_start_ray_commands"][1].replace("RAY_AUTH_MODE=token ", "")
    rc, out = check_edited(tmp_path, capsys, cfg)
    assert rc == 2 and "3 problem(s)" in out
    assert all(s in out for s in ("max_wrokers", "setup_commands", "worker_start_ray_commands[1]"))


def test_bad_yaml_names_file_and_line(tmp_path, capsys):
    text = LOCAL.read_text().replace("  head_ip: HEAD_HOST", " head_ip: HEAD_HOST")
    rc, out = check_edited(tmp_path, capsys, text)
    line = text.splitlines().index(" head_ip: HEAD_HOST") + 1
    assert rc == 2 and f"{tmp_path / 'cluster.yaml'}:{line}:" in out and "not valid YAML" in out


@pytest.mark.parametrize("text, expected", [("- a list\n", "not a mapping of keys"), ("", "empty file")])
def test_not_a_mapping(tmp_path, capsys, text, expected):
    rc, out = check_edited(tmp_path, capsys, text)
    assert rc == 2 and expected in out


def test_missing_file(tmp_path, capsys):
    rc, out = check(capsys, tmp_path / "none.yaml")
    assert rc == 2 and f"{tmp_path / 'none.yaml'}: no such file" in out


def test_unknown_provider_type(tmp_path, capsys):
    cfg = shipped(AWS)
    cfg["provider"]["type"] = "gce"
    rc, out = check_edited(tmp_path, capsys, cfg)
    assert rc == 2
    assert "provider.type: 'gce' is not a provider Ray's cluster launcher knows; did you mean 'gcp'?" in out


def test_kuberay_without_auth_options(tmp_path, capsys):
    cfg = shipped(KUBERAY)
    del cfg["spec"]["authOptions"]
    rc, out = check_edited(tmp_path, capsys, cfg)
    assert rc == 2 and "spec.authOptions: missing: Ray token authentication is off" in out


def test_kuberay_version_and_dashboard_default(tmp_path, capsys):
    cfg = shipped(KUBERAY)
    cfg["spec"]["rayVersion"] = "2.59.0"
    del cfg["spec"]["headGroupSpec"]["rayStartParams"]["dashboard-host"]
    rc, out = check_edited(tmp_path, capsys, cfg)
    assert rc == 2 and "spec.rayVersion: '2.59.0', but Shipyard runs Ray" in out
    assert (
        "spec.headGroupSpec.rayStartParams.dashboard-host: not set, and KubeRay then starts the dashboard on "
        "0.0.0.0" in out
    )


def test_rayservice_serve_config_is_validated(tmp_path, capsys):
    cluster = shipped(KUBERAY)
    serve = {"http_options": {"host": "0.0.0.0"}, "applications": [{"name": "digits", "import_pth": "x:y"}]}
    service = {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": "shipyard"},
        "spec": {"serveConfigV2": yaml.safe_dump(serve), "rayClusterConfig": cluster["spec"]},
    }
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "shipyard-ray-token"}}
    rc, out = check_edited(tmp_path, capsys, yaml.safe_dump(secret) + "---\n" + yaml.safe_dump(service))
    assert rc == 2
    assert "document 2: spec.serveConfigV2 -> applications[0].import_path: Field required" in out
    assert "document 2: spec.serveConfigV2 -> http_options.host: listens on all interfaces" in out


def test_schema_type_error_says_what_is_expected(tmp_path, capsys):
    cfg = shipped(LOCAL)
    cfg["max_workers"] = "one"
    rc, out = check_edited(tmp_path, capsys, cfg)
    assert rc == 2 and "max_workers: 'one' is not of type 'integer'" in out
    assert "expected an integer, e.g. `max_workers: 2`" in out


@pytest.mark.parametrize("where", ["launcher", "kuberay"])
def test_a_list_where_a_mapping_belongs_is_a_finding(tmp_path, capsys, where):
    cfg = shipped(AWS if where == "launcher" else KUBERAY)
    if where == "launcher":
        cfg["available_node_types"] = list(cfg["available_node_types"].values())
        expected = "available_node_types: [{"
    else:
        cfg["spec"]["headGroupSpec"] = [cfg["spec"]["headGroupSpec"]]
        expected = "spec.headGroupSpec.template.spec.containers[0]: missing"
    rc, out = check_edited(tmp_path, capsys, cfg)
    assert rc == 2 and expected in out and "Traceback" not in out and "cannot check" not in out


def test_an_unexpected_failure_is_one_line_not_a_traceback(tmp_path, capsys, monkeypatch):
    import shipyard.cluster.check

    def broken(path, allow_public=False):
        raise AttributeError("'list' object has no attribute 'get'")

    monkeypatch.setattr(shipyard.cluster.check, "check_file", broken)
    rc, out = check(capsys, LOCAL)
    assert rc == 2 and out.startswith(f"cannot check {LOCAL}: AttributeError: 'list' object has no attribute 'get';")


def test_module_docstring_example_holds(monkeypatch):
    import doctest

    import shipyard.cluster.check

    monkeypatch.chdir(ROOT)
    assert doctest.testmod(shipyard.cluster.check).failed == 0


def test_rays_own_log_lines_become_findings(tmp_path, capsys):
    """Ray's util logger warns through the `ray` logger's handler (the real stderr): none of it escapes."""
    seen: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = seen.append
    logging.getLogger("ray").addHandler(handler)
    try:
        rc, out = check_edited(
            tmp_path,
            capsys,
            {"cluster_name": "x", "max_workers": 1, "provider": {"type": "external", "module": "x.Provider"}},
        )
    finally:
        logging.getLogger("ray").removeHandler(handler)
    assert "warning: Ray: Dropping the empty legacy field head_node" in out
    assert not [r for r in seen if "legacy field" in r.getMessage()]


@pytest.mark.parametrize("flag", ["--dashboard-host ''", "--dashboard-host=", '--dashboard-host ""'])
def test_empty_dashboard_host_is_all_interfaces(tmp_path, capsys, flag):
    cfg = shipped(LOCAL)
    cfg["head_start_ray_commands"][1] = cfg["head_start_ray_commands"][1].replace("--dashboard-host=127.0.0.1", flag)
    rc, out = check_edited(tmp_path, capsys, cfg)
    assert rc == 2 and "head_start_ray_commands[1]: the dashboard listens on all interfaces (an empty host)" in out


def test_kuberay_dashboard_on_a_network_address_needs_allow_public(tmp_path, capsys):
    cfg = shipped(KUBERAY)
    cfg["spec"]["headGroupSpec"]["rayStartParams"]["dashboard-host"] = "10.0.0.5"
    rc, out = check_edited(tmp_path, capsys, cfg)
    assert rc == 2
    assert "error: spec.headGroupSpec.rayStartParams.dashboard-host: the dashboard listens on 10.0.0.5" in out
    rc, out = check_edited(tmp_path, capsys, cfg, "--allow-public")
    assert rc == 0 and "warning: spec.headGroupSpec.rayStartParams.dashboard-host: the dashboard listens" in out


def test_kuberay_stock_image_without_an_install_fails(tmp_path, capsys):
    cfg = shipped(KUBERAY)
    groups = [cfg["spec"]["headGroupSpec"], *cfg["spec"]["workerGroupSpecs"]]
    for group in groups:
        group["template"]["spec"]["containers"][0]["args"] = ["$KUBERAY_GEN_RAY_START_CMD"]
    rc, out = check_edited(tmp_path, capsys, cfg)
    assert rc == 2 and "2 problem(s)" in out
    for where in ("spec.headGroupSpec", "spec.workerGroupSpecs[0]"):
        assert f"error: {where}.template.spec.containers[0]: rayproject/ray:" in out
    assert "nothing in command/args installs it" in out and 'pip install "$SHIPYARD_SOURCE"' in out
    for group in groups:  # a custom image is taken to have Shipyard baked in: a warning
        group["template"]["spec"]["containers"][0]["image"] = "registry.example.com/shipyard:1"
    rc, out = check_edited(tmp_path, capsys, cfg)
    assert (
        rc == 0
        and "warning: spec.workerGroupSpecs[0].template.spec.containers[0]: nothing in command/args "
        "installs Shipyard, so registry.example.com/shipyard:1"
        in out
    )


@pytest.mark.parametrize(
    "command, expected",
    [
        (
            "make -C /opt/other install",
            "nothing brings the project to the nodes for `make -C /opt/other install`: it installs from /opt/other",
        ),
        ("pip install shipyard", "setup_commands: no command installs Shipyard on the nodes"),
        ("make -C ~/shipyard install", None),
        ("~/shipyard/scripts/install.sh", None),
        ("git clone https://github.com/org/shipyard.git /opt/sy && make -C /opt/sy install", None),
    ],
)
def test_only_the_projects_own_install_counts(tmp_path, capsys, command, expected):
    cfg = shipped(LOCAL)
    cfg["setup_commands"] = [command]
    rc, out = check_edited(tmp_path, capsys, cfg)
    assert (rc == 2 and expected in out) if expected else rc == 0, out


def test_aws_node_type_without_image_id_warns(tmp_path, capsys):
    cfg = shipped(AWS)
    del cfg["available_node_types"]["gpu_worker"]["node_config"]["ImageId"]
    rc, out = check_edited(tmp_path, capsys, cfg)
    assert (
        rc == 0
        and "warning: available_node_types.gpu_worker.node_config.ImageId: not set, so Ray launches "
        "its default AMI (Deep Learning AMI, Ubuntu 18.04, Python 3.6)"
        in out
    )
    assert "available_node_types.head.node_config.ImageId: YOUR_UBUNTU_2204_GPU_AMI is a placeholder" in out
