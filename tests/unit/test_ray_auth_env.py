"""raypod.ray_auth decides Ray's authentication mode before Ray does (in a fresh process:
Ray caches its config, and the conftest sets RAY_AUTH_MODE for this one)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

_PROBE = textwrap.dedent("""
    import json, os, sys
    from raypod import ray_auth
    getattr(ray_auth, sys.argv[1])()
    from ray._raylet import AuthenticationMode, get_authentication_mode
    print(json.dumps({"env": os.environ.get("RAY_AUTH_MODE"),
                      "token_mode": get_authentication_mode() == AuthenticationMode.TOKEN}))
""")


def _probe(home: Path, call: str, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    env.update(HOME=str(home), **extra)
    out = subprocess.run([sys.executable, "-c", _PROBE, call], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_new_cluster_gets_a_token_when_there_is_none(tmp_path):
    """No token file yet: one is generated (this user's only) and token mode is on for the
    process and the children it starts (``ray start`` inherits the environment)."""
    assert _probe(tmp_path, "for_new_cluster") == {"env": "token", "token_mode": True}
    token = tmp_path / ".ray" / "auth_token"
    assert len(token.read_text().strip()) >= 32
    assert stat.S_IMODE(token.stat().st_mode) == 0o600


def test_joining_sends_the_token_only_when_there_is_one(tmp_path):
    assert _probe(tmp_path, "for_joining") == {"env": None, "token_mode": False}
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("b" * 32)
    assert _probe(tmp_path, "for_joining") == {"env": "token", "token_mode": True}


def test_an_explicit_mode_is_the_users(tmp_path):
    """raypod never changes a mode the user set (and never sets ``disabled`` itself)."""
    got = _probe(tmp_path, "for_new_cluster", RAY_AUTH_MODE="disabled")
    assert got == {"env": "disabled", "token_mode": False}
    assert not (tmp_path / ".ray" / "auth_token").exists()
