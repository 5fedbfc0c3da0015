"""Client-side token authentication for the Ray Jobs API, set up in one place.

Ray 2.60 heads started by ``rayrec cluster start`` (and KubeRay clusters with auth enabled)
reject job-API calls without a token. ``JobSubmissionClient`` attaches the token by itself, but
only when the *client* process runs in token mode (``RAY_AUTH_MODE=token``); with the variable
unset it sends nothing and gets 401. ``ray start`` switches token mode on when a token exists;
clients do the same here, so nobody has to export the mode or copy the token on this machine.

Where the token comes from (Ray's own order): ``RAY_AUTH_TOKEN``, the file named by
``RAY_AUTH_TOKEN_PATH``, then ``~/.ray/auth_token`` (written by a local head).
"""

from __future__ import annotations

import os
from pathlib import Path

AUTH_MODE_ENV = "RAY_AUTH_MODE"


def token_available() -> bool:
    """True if a token is configured by env var, by token-path env var, or in ~/.ray/auth_token."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return True
    token_path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if token_path:
        return Path(token_path).expanduser().is_file()
    return (Path.home() / ".ray" / "auth_token").is_file()


def enable_client_token_auth() -> bool:
    """Put this process in token mode if a token is available and the user set no mode.

    Returns whether token mode is on. Must run before the first ``JobSubmissionClient``.
    """
    if os.environ.get(AUTH_MODE_ENV):
        return os.environ[AUTH_MODE_ENV].lower() == "token"
    if not token_available():
        return False
    os.environ[AUTH_MODE_ENV] = "token"
    # Ray caches its config (auth mode included) when it first loads; re-read it in case ray was
    # already used in this process. Private API, guarded: the env var alone covers fresh processes.
    try:
        from ray._raylet import Config

        Config.initialize("")
    except (ImportError, AttributeError):
        pass
    return True
