"""Validate jobs/clusters/gcp.yaml against Ray's own cluster-launcher schema and check its settings.

Nothing here contacts GCP, and sockets are blocked while Ray's code runs. What is checked:

* the raw file against ``ray/autoscaler/ray-schema.json``;
* ``prepare_config`` + ``validate_config``, the steps `ray up` takes before it touches the cloud.
  For GCP, ``prepare_config`` only merges the file with the GCP ``defaults.yaml`` that ships
  with Ray;
* the offline parts of Ray's GCP bootstrap (``ray/autoscaler/_private/gcp/config.py``): the
  compute-vs-TPU node check, the subnet step (it must keep our networkInterfaces and make no
  API call), and the URLs Ray expands machineType/acceleratorType to. That module imports
  Google's API client (google-api-python-client), which is not installed here, so those
  imports are stubbed. Nothing that would call an API is run.

Not checked (needs GCP credentials and network): the project, IAM service account, SSH key
and subnet lookups of ``bootstrap_gcp``, and whether GCE accepts the instance bodies,
the image family, the zone's A100 capacity or your quota.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import json
import re
import sys
import types
from collections.abc import Iterator
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
from ray.autoscaler._private.util import check_legacy_fields, prepare_config, validate_config

GCP_YAML = REPO_ROOT / "jobs" / "clusters" / "gcp.yaml"
AWS_YAML = REPO_ROOT / "cluster.yaml"

# GCP project ids: 6-30 characters, lowercase letters, digits and hyphens, starting with a letter.
PROJECT_ID_RE = re.compile(r"[a-z][a-z0-9-]{4,28}[a-z0-9]")
# Accelerator-optimized machine families: their GPUs come with the machine type.
GPU_MACHINE_PREFIXES = ("a2-", "a3-", "a4-", "g2-", "g4-")


# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def raw_text() -> str:
    assert GCP_YAML.is_file(), f"missing {GCP_YAML}"
    return GCP_YAML.read_text()


@pytest.fixture()
def config(raw_text: str) -> dict[str, Any]:
    return load_config(raw_text)


@pytest.fixture()
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    block_network(monkeypatch)


RAY_GCP_MODULES = ("ray.autoscaler._private.gcp.config", "ray.autoscaler._private.gcp.node")


def _import_ray_gcp() -> types.SimpleNamespace:
    return types.SimpleNamespace(**{m.rsplit(".", 1)[1]: importlib.import_module(m) for m in RAY_GCP_MODULES})


@pytest.fixture()
def ray_gcp(monkeypatch: pytest.MonkeyPatch) -> Iterator[types.SimpleNamespace]:
    """Ray's GCP bootstrap and node modules, importable without google-api-python-client.

    Only the names those modules import are stubbed, and nothing run here calls them.
    Ray's modules are imported fresh against the stubs and removed again afterwards.
    """
    if importlib.util.find_spec("googleapiclient") is not None:  # pragma: no cover
        yield _import_ray_gcp()
        return
    stubs = {
        name: types.ModuleType(name)
        for name in (
            "googleapiclient",
            "googleapiclient.discovery",
            "googleapiclient.errors",
            "googleapiclient.http",
            "google_auth_httplib2",
            "httplib2",
        )
    }
    stubs["googleapiclient.discovery"].Resource = object
    stubs["googleapiclient.errors"].HttpError = type("HttpError", (Exception,), {})
    stubs["google_auth_httplib2"].AuthorizedHttp = object
    for sub in ("discovery", "errors", "http"):
        setattr(stubs["googleapiclient"], sub, stubs[f"googleapiclient.{sub}"])
    for name, module in stubs.items():
        monkeypatch.setitem(sys.modules, name, module)
    package = importlib.import_module("ray.autoscaler._private.gcp")
    saved = {name: sys.modules.pop(name) for name in RAY_GCP_MODULES if name in sys.modules}
    saved_attrs = {a: getattr(package, a) for a in ("config", "node") if hasattr(package, a)}
    try:
        yield _import_ray_gcp()
    finally:
        for name in RAY_GCP_MODULES:
            sys.modules.pop(name, None)
        sys.modules.update(saved)
        for attr in ("config", "node"):
            if attr in saved_attrs:
                setattr(package, attr, saved_attrs[attr])
            elif hasattr(package, attr):
                delattr(package, attr)


class _NoComputeApi:
    """Stands in for the Compute Engine client. Any use of it is an API call, i.e. a failure."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"Ray called the Compute Engine API ({name}) for this config")


def _boot_image(node_config: dict[str, Any]) -> str | None:
    boot = [d for d in node_config.get("disks", []) if d.get("boot")]
    assert len(boot) == 1, node_config.get("disks")
    return boot[0].get("initializeParams", {}).get("sourceImage")


def _worker_types(cfg: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n: nt for n, nt in cfg["available_node_types"].items() if n != cfg["head_node_type"]}


# --------------------------------------------------------------------------- schema


def test_raw_file_matches_ray_schema(config: dict[str, Any]) -> None:
    schema = json.loads(SCHEMA_PATH.read_text())
    jsonschema.validate(config, schema)


def test_prepare_and_validate_like_ray_up(config: dict[str, Any], no_network: None) -> None:
    prepared = prepare_like_ray_up(config)
    check_legacy_fields(prepared)  # the first step of Ray's bootstrap_gcp
    # prepare_config merged the GCP defaults (e.g. cluster_synced_files) but kept our overrides.
    assert "cluster_synced_files" in prepared and "cluster_synced_files" not in config
    for key in ("provider", "available_node_types", "head_start_ray_commands", "worker_start_ray_commands"):
        assert prepared[key] == config[key], key
    # Both setup_commands and head/worker-specific ones end up on the nodes.
    assert "pip install -e ~/raypod" in prepared["head_setup_commands"]
    assert "pip install -e ~/raypod" in prepared["worker_setup_commands"]
    # The autoscaler on the head needs Google's API client; the workers do not.
    assert any("google-api-python-client" in c for c in prepared["head_setup_commands"])
    assert not any("google-api-python-client" in c for c in prepared["worker_setup_commands"])


def test_offline_steps_of_ray_gcp_bootstrap(
    config: dict[str, Any], no_network: None, ray_gcp: types.SimpleNamespace
) -> None:
    prepared = prepare_like_ray_up(config)
    gcp_config, gcp_node = ray_gcp.config, ray_gcp.node
    # Every node type is a Compute Engine VM (not a TPU).
    assert not gcp_config._has_tpus_in_node_configs(prepared)
    assert not gcp_config._is_head_node_a_tpu(prepared)
    # All node types set networkInterfaces, so Ray keeps them as written: no subnet lookup,
    # and no External NAT (external IP) added to the workers.
    assert gcp_config._configure_subnet(prepared, _NoComputeApi()) == prepared
    # The instance bodies Ray sends to instances.insert get full URLs in our zone.
    provider = prepared["provider"]
    compute = gcp_node.GCPCompute(None, provider["project_id"], provider["availability_zone"], "raypod")
    for name, nt in prepared["available_node_types"].items():
        body = compute._convert_resources_to_urls(nt["node_config"])
        zone = provider["availability_zone"]
        assert body["machineType"] == f"zones/{zone}/machineTypes/{nt['node_config']['machineType']}", name
        for acc in body.get("guestAccelerators", []):
            assert acc["acceleratorType"].startswith(
                f"projects/{provider['project_id']}/zones/{zone}/acceleratorTypes/"
            ), acc


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(lambda c: c.__setitem__("not_a_ray_key", 1), id="unknown-top-level-key"),
        pytest.param(lambda c: head_type(c).__setitem__("bogus", True), id="unknown-node-type-key"),
        pytest.param(lambda c: head_type(c)["resources"].__setitem__("CPU", -1), id="negative-resource"),
        pytest.param(lambda c: c["provider"].__setitem__("project_id", 12345), id="project-id-not-string"),
        pytest.param(
            lambda c: c["provider"].__setitem__("gcp_credentials", {"type": "password"}),
            id="bad-gcp-credentials-type",
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
    assert provider["type"] == "gcp"
    assert provider["availability_zone"].startswith(provider["region"] + "-")
    assert provider["cache_stopped_nodes"] is False
    assert isinstance(config["max_workers"], int) and config["max_workers"] > 0
    assert config["idle_timeout_minutes"] > 0
    assert config["upscaling_speed"] > 0


def test_project_id_is_a_marked_placeholder_or_a_real_id(raw_text: str, config: dict[str, Any]) -> None:
    project_id = config["provider"]["project_id"]
    assert isinstance(project_id, str) and PROJECT_ID_RE.fullmatch(project_id), project_id
    if project_id == "your-gcp-project-id":
        line = next(ln for ln in raw_text.splitlines() if "project_id:" in ln)
        assert "REPLACE" in line, "mark the placeholder project id on its own line"


def test_zone_and_region_urls_match_provider(config: dict[str, Any]) -> None:
    """diskType / subnetwork partial URLs must name the provider's zone and region."""
    provider = config["provider"]
    for name, nt in config["available_node_types"].items():
        text = json.dumps(nt["node_config"])
        assert set(re.findall(r"zones/([a-z0-9-]+)/", text)) <= {provider["availability_zone"]}, name
        assert set(re.findall(r"regions/([a-z0-9-]+)/", text)) <= {provider["region"]}, name


def test_head_is_cpu_only_and_takes_no_training_ranks(config: dict[str, Any]) -> None:
    assert_head_advertises_no_resources(config)
    node_config = head_type(config)["node_config"]
    assert not node_config.get("guestAccelerators")
    assert not node_config["machineType"].startswith(GPU_MACHINE_PREFIXES)
    # On-demand: losing the head loses the cluster.
    assert node_config.get("scheduling", {}).get("provisioningModel", "STANDARD") == "STANDARD"
    assert not node_config.get("scheduling", {}).get("preemptible", False)


def test_gpu_worker_type_autoscales(config: dict[str, Any]) -> None:
    found = assert_gpu_worker_types_autoscale(config)
    assert sum(nt["max_workers"] for nt in found.values()) == config["max_workers"] == 8
    for name, nt in found.items():
        node_config = nt["node_config"]
        accelerators = node_config.get("guestAccelerators", [])
        assert accelerators, f"{name}: declare the GPUs in guestAccelerators"
        assert sum(a["acceleratorCount"] for a in accelerators) == nt["resources"]["GPU"], name
        scheduling = node_config["scheduling"]
        assert isinstance(scheduling, dict), "scheduling is an object in the GCE API, not a list"
        # GPU VMs cannot live-migrate: GCE rejects them unless maintenance terminates them.
        assert scheduling["onHostMaintenance"] == "TERMINATE", name
        if scheduling.get("provisioningModel") == "SPOT":
            assert scheduling.get("automaticRestart") is False, name


def test_same_image_on_all_nodes(config: dict[str, Any]) -> None:
    images = {_boot_image(nt["node_config"]) for nt in config["available_node_types"].values()}
    assert len(images) == 1 and None not in images, images
    (image,) = images
    assert image.startswith("projects/deeplearning-platform-release/"), image
    assert "common-cpu" not in image, "Ray's default image has no CUDA"


# --------------------------------------------------------------------------- install


def test_repo_mounted_and_installed_editable(config: dict[str, Any]) -> None:
    assert_repo_mounted_and_installed_editable(config)


def test_cluster_ray_version_matches_local(config: dict[str, Any]) -> None:
    assert_ray_pinned_to_local_version(config)


def test_same_install_and_start_as_aws(config: dict[str, Any]) -> None:
    """The GCP file keeps the AWS file's mounts, rsync rules, ray pin and start commands."""
    aws = load_config(AWS_YAML.read_text())
    for key in (
        "file_mounts",
        "rsync_exclude",
        "rsync_filter",
        "head_start_ray_commands",
        "worker_start_ray_commands",
    ):
        assert config[key] == aws[key], key
    aws_common = [c for c in aws["setup_commands"] if "/opt/pytorch" not in c]
    assert [c for c in config["setup_commands"] if c in aws_common] == aws_common


# --------------------------------------------------------------------------- security


def test_only_the_head_has_an_external_ip(config: dict[str, Any]) -> None:
    """GCP has no per-cluster security group: Ray creates no firewall rules. The config keeps
    the workers off the internet (no accessConfigs) and gives the head one external IP for SSH."""
    for name, nt in config["available_node_types"].items():
        interfaces = nt["node_config"].get("networkInterfaces")
        # Without networkInterfaces on *every* type, Ray picks a subnet itself and gives every
        # node an External NAT (ray/autoscaler/_private/gcp/config.py::_configure_subnet).
        assert interfaces, f"{name}: set networkInterfaces explicitly"
        for nic in interfaces:
            assert nic.get("subnetwork") or nic.get("network"), nic
    for name, nt in _worker_types(config).items():
        for nic in nt["node_config"]["networkInterfaces"]:
            assert not nic.get("accessConfigs") and not nic.get("ipv6AccessConfigs"), name
    head_nics = head_type(config)["node_config"]["networkInterfaces"]
    access = [ac for nic in head_nics for ac in nic.get("accessConfigs", [])]
    assert [ac["type"] for ac in access] == ["ONE_TO_ONE_NAT"], access


def test_workers_get_only_storage_credentials(config: dict[str, Any]) -> None:
    for name, nt in _worker_types(config).items():
        for sa in nt["node_config"].get("serviceAccounts", []):
            assert sa["scopes"] == ["https://www.googleapis.com/auth/devstorage.read_write"], name


def test_dashboard_bound_to_loopback(config: dict[str, Any]) -> None:
    assert_dashboard_bound_to_loopback(config)


def test_token_auth_never_disabled(raw_text: str, config: dict[str, Any]) -> None:
    assert_token_auth_never_disabled(raw_text, config)


def test_worker_start_joins_head(config: dict[str, Any]) -> None:
    assert_worker_start_joins_head(config)
