"""Validate cluster.yaml against Ray's own cluster-launcher schema and check its security settings.

Nothing here contacts AWS. Ray's ``prepare_config`` only merges the file with the AWS
``defaults.yaml`` that ships with Ray. The test blocks sockets while it runs, to prove this.
The checks shared with the GCP config (jobs/clusters/gcp.yaml) live in cluster_checks.py.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import jsonschema
import pytest
from cluster_checks import (
    REPO_ROOT,
    SCHEMA_PATH,
    assert_dashboard_bound_to_loopback,
    assert_gpu_worker_types_autoscale,
    assert_head_advertises_no_resources,
    assert_ray_pinned_to_local_version,
    assert_repo_mounted_and_installed_editable,
    assert_token_auth_never_disabled,
    assert_worker_start_joins_head,
    block_network,
    head_type,
    load_config,
    prepare_like_ray_up,
)
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER_YAML = REPO_ROOT / "cluster.yaml"


# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def raw_text() -> str:
    assert CLUSTER_YAML.is_file(), f"missing {CLUSTER_YAML}"
    return CLUSTER_YAML.read_text()


@pytest.fixture()
def config(raw_text: str) -> dict[str, Any]:
    return load_config(raw_text)


@pytest.fixture()
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    block_network(monkeypatch)


# --------------------------------------------------------------------------- schema


def test_raw_file_matches_ray_schema(config: dict[str, Any]) -> None:
    schema = json.loads(SCHEMA_PATH.read_text())
    jsonschema.validate(config, schema)


def test_prepare_and_validate_like_ray_up(config: dict[str, Any], no_network: None) -> None:
    prepared = prepare_like_ray_up(config)
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
        pytest.param(lambda c: head_type(c).__setitem__("bogus", True), id="unknown-node-type-key"),
        pytest.param(
            lambda c: head_type(c)["resources"].__setitem__("CPU", -1), id="negative-resource"
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
    assert_head_advertises_no_resources(config)
    assert not head_type(config)["node_config"]["InstanceType"].startswith(("g", "p"))


def test_gpu_worker_type_autoscales(config: dict[str, Any]) -> None:
    assert_gpu_worker_types_autoscale(config)


def test_same_image_on_all_nodes(config: dict[str, Any]) -> None:
    images = {nt["node_config"].get("ImageId") for nt in config["available_node_types"].values()}
    assert len(images) == 1 and None not in images, images


# --------------------------------------------------------------------------- install


def test_repo_mounted_and_installed_editable(config: dict[str, Any]) -> None:
    assert_repo_mounted_and_installed_editable(config)


def test_cluster_ray_version_matches_local(config: dict[str, Any]) -> None:
    assert_ray_pinned_to_local_version(config)


# --------------------------------------------------------------------------- security


def test_inbound_rules_are_ssh_only(config: dict[str, Any]) -> None:
    sg = config["provider"].get("security_group")
    assert sg is not None, "declare provider.security_group explicitly"
    for rule in sg.get("IpPermissions", []):
        assert rule.get("IpProtocol") == "tcp", rule
        assert rule.get("FromPort") == 22 and rule.get("ToPort") == 22, rule


def test_dashboard_bound_to_loopback(config: dict[str, Any]) -> None:
    assert_dashboard_bound_to_loopback(config)


def test_token_auth_never_disabled(raw_text: str, config: dict[str, Any]) -> None:
    assert_token_auth_never_disabled(raw_text, config)


def test_worker_start_joins_head(config: dict[str, Any]) -> None:
    assert_worker_start_joins_head(config)
