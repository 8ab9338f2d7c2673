"""Validate cluster.yaml against Ray's own cluster-launcher schema and check its security settings.

Nothing here contacts AWS. Ray's ``prepare_config`` only merges the file with the AWS
``defaults.yaml`` that ships with Ray. The test blocks sockets while it runs, to prove this.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

REPO_ROOT = Path(__file__).resolve().parents[2]
CLUSTER_YAML = REPO_ROOT / "cluster.yaml"
SCHEMA_PATH = Path(ray.autoscaler.__file__).parent / "ray-schema.json"

AUTH_OFF_RE = re.compile(r"RAY_AUTH_MODE\s*=\s*[\"']?(disabled|none|off|false|0)\b", re.IGNORECASE)


# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def raw_text() -> str:
    assert CLUSTER_YAML.is_file(), f"missing {CLUSTER_YAML}"
    return CLUSTER_YAML.read_text()


@pytest.fixture()
def config(raw_text: str) -> dict[str, Any]:
    cfg = yaml.safe_load(raw_text)
    assert isinstance(cfg, dict), "cluster.yaml must be a mapping"
    return cfg


class _NetworkBlocked(RuntimeError):
    pass


@pytest.fixture()
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def _blocked(*args: Any, **kwargs: Any) -> None:
        raise _NetworkBlocked(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", _blocked)
    monkeypatch.setattr(socket.socket, "connect_ex", _blocked)
    monkeypatch.setattr(socket, "create_connection", _blocked)
    monkeypatch.setattr(socket, "getaddrinfo", _blocked)


def _prepare(cfg: dict[str, Any]) -> dict[str, Any]:
    """Do what `ray up` does before it contacts the cloud: prepare_config, then validate_config."""
    try:
        prepared = prepare_config(copy.deepcopy(cfg))
    except _NetworkBlocked as exc:  # pragma: no cover - would mean Ray changed behaviour
        pytest.skip(f"prepare_config needs the network in this Ray version: {exc}")
    validate_config(prepared)
    return prepared


def _strings(obj: Any) -> Iterator[str]:
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield str(k)
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)


def _ray_start_argv(commands: list[str], *, head: bool) -> list[list[str]]:
    """The argv of each `ray start` in the commands (a command may chain several with ';')."""
    found = []
    for cmd in commands:
        for part in re.split(r";|&&|\|\|", cmd):
            argv = shlex.split(part)
            if argv[:2] == ["ray", "start"] and (("--head" in argv) == head):
                found.append(argv)
    return found


def _flag(argv: list[str], name: str) -> str | None:
    for i, tok in enumerate(argv):
        if tok.startswith(name + "="):
            return tok.split("=", 1)[1]
        if tok == name and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _head(cfg: dict[str, Any]) -> dict[str, Any]:
    return cfg["available_node_types"][cfg["head_node_type"]]


def _gpu_types(cfg: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: nt
        for name, nt in cfg["available_node_types"].items()
        if name != cfg["head_node_type"] and nt.get("resources", {}).get("GPU", 0) > 0
    }


# --------------------------------------------------------------------------- schema


def test_raw_file_matches_ray_schema(config: dict[str, Any]) -> None:
    schema = json.loads(SCHEMA_PATH.read_text())
    jsonschema.validate(config, schema)


def test_prepare_and_validate_like_ray_up(config: dict[str, Any], no_network: None) -> None:
    prepared = _prepare(config)
    # prepare_config merged the AWS defaults but must keep our overrides.
    assert prepared["head_start_ray_commands"] == config["head_start_ray_commands"]
    assert prepared["provider"] == config["provider"]
    # Both setup_commands and head/worker-specific ones end up on the nodes.
    assert "pip install -e ~/raypod" in prepared["head_setup_commands"]
    assert "pip install -e ~/raypod" in prepared["worker_setup_commands"]


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(lambda c: c.__setitem__("not_a_ray_key", 1), id="unknown-top-level-key"),
        pytest.param(lambda c: _head(c).__setitem__("bogus", True), id="unknown-node-type-key"),
        pytest.param(
            lambda c: _head(c)["resources"].__setitem__("CPU", -1), id="negative-resource"
        ),
        pytest.param(
            lambda c: c["provider"]["security_group"].__setitem__("Ingress", []),
            id="unknown-security-group-key",
        ),
        pytest.param(lambda c: c.__setitem__("max_workers", "eight"), id="wrong-type"),
        pytest.param(lambda c: c["provider"].pop("type"), id="missing-provider-type"),
    ],
)
def test_validator_rejects_broken_copy(config: dict[str, Any], mutate: Any) -> None:
    """Shows the validator is really running: a broken copy must be rejected."""
    broken = copy.deepcopy(config)
    mutate(broken)
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(broken) if "type" in broken["provider"] else broken)


def test_validator_rejects_unknown_head_node_type(config: dict[str, Any]) -> None:
    broken = copy.deepcopy(config)
    broken["head_node_type"] = "does.not.exist"
    with pytest.raises(ValueError, match="head_node_type"):
        validate_config(prepare_config(broken))


# --------------------------------------------------------------------------- cluster shape


def test_basic_settings(config: dict[str, Any]) -> None:
    assert config["cluster_name"] == "raypod"
    provider = config["provider"]
    assert provider["type"] == "aws"
    assert provider["region"] == "us-west-2"
    assert provider["cache_stopped_nodes"] is False
    assert isinstance(config["max_workers"], int) and config["max_workers"] > 0
    assert config["idle_timeout_minutes"] > 0
    assert config["upscaling_speed"] > 0


def test_head_is_cpu_only_and_takes_no_training_ranks(config: dict[str, Any]) -> None:
    head = _head(config)
    assert head["resources"].get("CPU") == 0, "head must advertise CPU: 0"
    assert head["resources"].get("GPU", 0) == 0
    assert head.get("max_workers", 0) == 0
    assert not head["node_config"]["InstanceType"].startswith(("g", "p"))


def test_gpu_worker_type_autoscales(config: dict[str, Any]) -> None:
    gpu_types = _gpu_types(config)
    assert gpu_types, "need at least one worker node type with GPU resources"
    for name, nt in gpu_types.items():
        lo, hi = nt.get("min_workers", 0), nt["max_workers"]
        assert 0 <= lo < hi, f"{name}: min_workers {lo} must be < max_workers {hi}"
        assert hi <= config["max_workers"], f"{name}: max_workers exceeds global max_workers"
        assert nt["resources"]["CPU"] > 0


def test_same_image_on_all_nodes(config: dict[str, Any]) -> None:
    images = {nt["node_config"].get("ImageId") for nt in config["available_node_types"].values()}
    assert len(images) == 1 and None not in images, images


# --------------------------------------------------------------------------- install


def test_repo_mounted_and_installed_editable(config: dict[str, Any]) -> None:
    assert config["file_mounts"].get("~/raypod") == "."
    assert "pip install -e ~/raypod" in config["setup_commands"]
    assert "**/.venv" in config.get("rsync_exclude", [])
    assert not any("--index-url" in c and "cpu" in c for c in _strings(config["setup_commands"]))


def test_cluster_ray_version_matches_local(config: dict[str, Any]) -> None:
    pins = [
        m.group(1)
        for cmd in config["setup_commands"]
        for m in [re.search(r"ray\[[^\]]*\]==([0-9][^\"'\s]*)", cmd)]
        if m
    ]
    assert pins == [ray.__version__], f"pin ray on the cluster to {ray.__version__}: {pins}"


# --------------------------------------------------------------------------- security


def test_inbound_rules_are_ssh_only(config: dict[str, Any]) -> None:
    sg = config["provider"].get("security_group")
    assert sg is not None, "declare provider.security_group explicitly"
    for rule in sg.get("IpPermissions", []):
        assert rule.get("IpProtocol") == "tcp", rule
        assert rule.get("FromPort") == 22 and rule.get("ToPort") == 22, rule


def test_dashboard_bound_to_loopback(config: dict[str, Any]) -> None:
    head_starts = _ray_start_argv(config["head_start_ray_commands"], head=True)
    assert len(head_starts) == 1, config["head_start_ray_commands"]
    argv = head_starts[0]
    assert _flag(argv, "--dashboard-host") == "127.0.0.1"
    assert _flag(argv, "--port") == "6379"
    assert _flag(argv, "--autoscaling-config") == "~/ray_bootstrap_config.yaml"
    all_text = "\n".join(_strings(config))
    assert "0.0.0.0" not in all_text


def test_token_auth_never_disabled(raw_text: str, config: dict[str, Any]) -> None:
    assert not AUTH_OFF_RE.search(raw_text), "token auth must stay on"
    for s in _strings(config):
        assert not AUTH_OFF_RE.search(s), s
    # Every `ray start` forces token mode and every node gets the token.
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in config[key] if "ray start" in c]
        assert starts, key
        for cmd in starts:
            assert "RAY_AUTH_MODE=token" in cmd, cmd
            assert cmd.index("RAY_AUTH_MODE=token") < cmd.index("ray start"), cmd
    assert "~/.ray/auth_token" in config["file_mounts"]


def test_worker_start_joins_head(config: dict[str, Any]) -> None:
    (argv,) = _ray_start_argv(config["worker_start_ray_commands"], head=False)
    assert _flag(argv, "--address") == "$RAY_HEAD_IP:6379"
