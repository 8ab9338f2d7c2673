"""Checks shared by the cluster launcher config tests (test_cluster_yaml.py, test_cluster_gcp.py).

Every config must pass Ray's own validation offline, keep Ray token authentication on,
bind the dashboard to loopback, mount and install the repo the same way and pin the
local Ray version. The cloud-specific parts stay in each test file.
"""

from __future__ import annotations

import copy
import re
import shlex
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

REPO_ROOT = Path(__file__).resolve().parents[3]
SCHEMA_PATH = Path(ray.autoscaler.__file__).parent / "ray-schema.json"

AUTH_OFF_RE = re.compile(r"RAY_AUTH_MODE\s*=\s*[\"']?(disabled|none|off|false|0)\b", re.IGNORECASE)


def load_config(text: str) -> dict[str, Any]:
    cfg = yaml.safe_load(text)
    assert isinstance(cfg, dict), "a cluster config must be a mapping"
    return cfg


class NetworkBlocked(RuntimeError):
    pass


def block_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every socket connection and DNS lookup raise NetworkBlocked."""

    def _blocked(*args: Any, **kwargs: Any) -> None:
        raise NetworkBlocked(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", _blocked)
    monkeypatch.setattr(socket.socket, "connect_ex", _blocked)
    monkeypatch.setattr(socket, "create_connection", _blocked)
    monkeypatch.setattr(socket, "getaddrinfo", _blocked)


def prepare_like_ray_up(cfg: dict[str, Any]) -> dict[str, Any]:
    """Do what `ray up` does before it contacts the cloud: prepare_config, then validate_config."""
    try:
        prepared = prepare_config(copy.deepcopy(cfg))
    except NetworkBlocked as exc:  # pragma: no cover - would mean Ray changed behaviour
        pytest.skip(f"prepare_config needs the network in this Ray version: {exc}")
    validate_config(prepared)
    return prepared


def strings(obj: Any) -> Iterator[str]:
    """Every string (keys included) anywhere in a loaded YAML document."""
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield str(k)
            yield from strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from strings(v)


def ray_start_argv(commands: list[str], *, head: bool) -> list[list[str]]:
    """The argv of each `ray start` in the commands (a command may chain several with ';')."""
    found = []
    for cmd in commands:
        for part in re.split(r";|&&|\|\|", cmd):
            argv = shlex.split(part)
            if argv[:2] == ["ray", "start"] and (("--head" in argv) == head):
                found.append(argv)
    return found


def flag(argv: list[str], name: str) -> str | None:
    for i, tok in enumerate(argv):
        if tok.startswith(name + "="):
            return tok.split("=", 1)[1]
        if tok == name and i + 1 < len(argv):
            return argv[i + 1]
    return None


def head_type(cfg: dict[str, Any]) -> dict[str, Any]:
    return cfg["available_node_types"][cfg["head_node_type"]]


def gpu_types(cfg: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: nt
        for name, nt in cfg["available_node_types"].items()
        if name != cfg["head_node_type"] and nt.get("resources", {}).get("GPU", 0) > 0
    }


# --------------------------------------------------------------------------- shared assertions


def assert_head_advertises_no_resources(cfg: dict[str, Any]) -> None:
    head = head_type(cfg)
    assert head["resources"].get("CPU") == 0, "head must advertise CPU: 0"
    assert head["resources"].get("GPU", 0) == 0
    assert head.get("max_workers", 0) == 0


def assert_gpu_worker_types_autoscale(cfg: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found = gpu_types(cfg)
    assert found, "need at least one worker node type with GPU resources"
    for name, nt in found.items():
        lo, hi = nt.get("min_workers", 0), nt["max_workers"]
        assert 0 <= lo < hi, f"{name}: min_workers {lo} must be < max_workers {hi}"
        assert hi <= cfg["max_workers"], f"{name}: max_workers exceeds global max_workers"
        assert nt["resources"]["CPU"] > 0
    return found


def assert_repo_mounted_and_installed_editable(cfg: dict[str, Any]) -> None:
    assert cfg["file_mounts"].get("~/raypod") == "."
    assert "pip install -e ~/raypod" in cfg["setup_commands"]
    assert "**/.venv" in cfg.get("rsync_exclude", [])
    assert not any("--index-url" in c and "cpu" in c for c in strings(cfg["setup_commands"]))


def assert_ray_pinned_to_local_version(cfg: dict[str, Any]) -> None:
    pins = [
        m.group(1)
        for cmd in cfg["setup_commands"]
        for m in [re.search(r"ray\[[^\]]*\]==([0-9][^\"'\s]*)", cmd)]
        if m
    ]
    assert pins == [ray.__version__], f"pin ray on the cluster to {ray.__version__}: {pins}"


def assert_dashboard_bound_to_loopback(cfg: dict[str, Any]) -> None:
    head_starts = ray_start_argv(cfg["head_start_ray_commands"], head=True)
    assert len(head_starts) == 1, cfg["head_start_ray_commands"]
    argv = head_starts[0]
    assert flag(argv, "--dashboard-host") == "127.0.0.1"
    assert flag(argv, "--port") == "6379"
    assert flag(argv, "--autoscaling-config") == "~/ray_bootstrap_config.yaml"
    all_text = "\n".join(strings(cfg))
    assert "0.0.0.0" not in all_text


def assert_token_auth_never_disabled(raw_text: str, cfg: dict[str, Any]) -> None:
    assert not AUTH_OFF_RE.search(raw_text), "token auth must stay on"
    for s in strings(cfg):
        assert not AUTH_OFF_RE.search(s), s
    # Every `ray start` forces token mode and every node gets the token.
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in cfg[key] if "ray start" in c]
        assert starts, key
        for cmd in starts:
            assert "RAY_AUTH_MODE=token" in cmd, cmd
            assert cmd.index("RAY_AUTH_MODE=token") < cmd.index("ray start"), cmd
    assert "~/.ray/auth_token" in cfg["file_mounts"]


def assert_worker_start_joins_head(cfg: dict[str, Any]) -> None:
    (argv,) = ray_start_argv(cfg["worker_start_ray_commands"], head=False)
    assert flag(argv, "--address") == "$RAY_HEAD_IP:6379"
