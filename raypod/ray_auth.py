"""Ray token authentication for every cluster raypod starts or joins.

Ray 2.60 settles authentication per process, from ``RAY_AUTH_MODE`` (read into Ray's
config). When it is unset, ``ray start --head`` enforces a token exactly when a token
already exists (``~/.ray/auth_token``, ``RAY_AUTH_TOKEN_PATH`` or ``RAY_AUTH_TOKEN``), a
``ray.init()`` that starts a new local cluster always does (and generates the token),
and a ``ray.init(address=...)`` that joins a cluster never sends one. So a process that
starts a cluster with ``ray start`` and then joins it, or joins a token cluster by its
address, gets "Authentication token is missing or incorrect" on a machine where a token
file exists, and a cluster without authentication where none does.

raypod settles the mode itself, before Ray reads it, and never turns authentication off:

* :func:`for_new_cluster` (before starting a cluster this process joins): token mode for
  this process and its children, the token generated when there is none;
* :func:`for_joining` (before ``ray.init(address=...)``): token mode when a token is
  available, as ``ray start`` decides.

An explicit ``RAY_AUTH_MODE`` is the user's and is left as it is (the cluster a process
starts inherits it, so both sides agree).
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger("raypod.ray_auth")

AUTH_MODE_VAR = "RAY_AUTH_MODE"


def token_available() -> bool:
    """Whether a Ray token exists for this user (file, ``RAY_AUTH_TOKEN_PATH`` or ``RAY_AUTH_TOKEN``)."""
    from ray._raylet import AuthenticationTokenLoader

    return bool(AuthenticationTokenLoader.instance().has_token(ignore_auth_mode=True))


def _token_mode() -> None:
    """Token mode for this process (Ray's cached config refreshed) and its children."""
    os.environ[AUTH_MODE_VAR] = "token"
    from ray._raylet import Config

    Config.initialize("")  # what Ray does itself when it enables token mode for a new cluster


def for_new_cluster() -> None:
    """Before this process starts a cluster (``ray start --head``, ``ray.cluster_utils``)
    that it then joins: token authentication on, for both, with a token generated (as
    ``ray get-auth-token --generate`` does) when none exists. Call before ``ray.init``."""
    mode = os.environ.get(AUTH_MODE_VAR)
    if mode is not None and mode.lower() != "token":
        log.warning("%s=%s is set: the cluster starts with it, as asked", AUTH_MODE_VAR, mode)
        return
    if not token_available():
        from ray._private.authentication.authentication_token_setup import (
            _get_default_token_path,
            generate_and_save_token,
        )
        from ray._raylet import AuthenticationTokenLoader

        generate_and_save_token()  # ~/.ray/auth_token
        os.chmod(_get_default_token_path(), 0o600)  # a credential: this user's only
        AuthenticationTokenLoader.instance().reset_cache()
        log.info("generated a Ray authentication token in %s", _get_default_token_path())
    if mode is None:
        _token_mode()


def for_joining() -> None:
    """Before ``ray.init(address=...)`` joins an existing cluster: send the token when this
    user has one (a token cluster refuses a driver without it; one without authentication
    ignores it). Call before ``ray.init``."""
    if os.environ.get(AUTH_MODE_VAR) is None and token_available():
        _token_mode()
