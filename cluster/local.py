"""A local Ray head for ``rayrec cluster start|stop|status``, stoppable without touching other Rays.

``ray stop`` in Ray 2.60 kills *every* Ray process on the machine (it matches process names),
which would take down other users' clusters on a shared host. So the head is started as
``ray start --head --block`` in its own session: every process it spawns (GCS, raylet,
dashboard, workers) shares its process group, and ``stop`` signals exactly that group. The
head's facts (pid, ports, addresses) are kept in ``<temp_dir>/rayrec-head.json``.

Token authentication is switched on (``RAY_AUTH_MODE=token``); ``~/.ray/auth_token`` is created
if missing, and clients on this machine read it from there (``cluster/auth.py``), so nobody
copies tokens for a local cluster.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

from serving.serve_env import apply_serve_env

STATE_FILE = "rayrec-head.json"
LOG_FILE = "rayrec-head.log"
DEFAULT_GCS_PORT = 6379
DEFAULT_DASHBOARD_PORT = 8265
DEFAULT_METRICS_EXPORT_PORT = 8080


@dataclass(frozen=True)
class HeadConfig:
    """How to start a local head.

    Args:
        host: address the dashboard (and the job-submission API on it) binds to; loopback by
            default so nothing is exposed unless asked.
        gcs_port: the GCS port other nodes join with (``ray start --address host:gcs_port``).
        dashboard_port: dashboard + Ray Jobs REST API.
        metrics_export_port: Prometheus scrape endpoint of this node's metrics.
        num_cpus, num_gpus: resources the head advertises (None: Ray detects them).
        resources: extra custom resources, e.g. ``{"trainer": 1}``.
        temp_dir: Ray's root temp dir for this head; it also keys the state file, so one
            machine can hold several heads. Default: ``/tmp/rayrec/head-<gcs_port>``.
        token_auth: start with ``RAY_AUTH_MODE=token`` (Ray's default for local clusters).
    """

    host: str = "127.0.0.1"
    gcs_port: int = DEFAULT_GCS_PORT
    dashboard_port: int = DEFAULT_DASHBOARD_PORT
    metrics_export_port: int = DEFAULT_METRICS_EXPORT_PORT
    num_cpus: int | None = None
    num_gpus: int | None = None
    resources: dict[str, float] = field(default_factory=dict)
    temp_dir: str | None = None
    token_auth: bool = True

    def resolved_temp_dir(self) -> Path:
        return Path(self.temp_dir) if self.temp_dir else default_temp_dir(self.gcs_port)


@dataclass(frozen=True)
class HeadInfo:
    """What ``start`` recorded about a running head (the content of the state file)."""

    pid: int
    gcs_address: str
    dashboard_url: str
    metrics_url: str
    temp_dir: str
    log_file: str
    started_at: float
    config: dict

    @property
    def job_submission_address(self) -> str:
        # The Ray Jobs REST API is served by the dashboard process.
        return self.dashboard_url


class HeadError(RuntimeError):
    """The head could not be started, found or stopped."""


def default_temp_dir(gcs_port: int) -> Path:
    # Short on purpose: Ray puts Unix sockets under it and socket paths are limited to ~107 bytes.
    return Path("/tmp/rayrec") / f"head-{gcs_port}"


def start_head(config: HeadConfig, timeout_s: float = 90.0) -> HeadInfo:
    """Start ``ray start --head --block`` in its own process group and wait until jobs can be submitted."""
    temp_dir = config.resolved_temp_dir()
    existing = read_state(temp_dir)
    if existing and _alive(existing.pid):
        raise HeadError(f"a head is already running from {temp_dir} (pid {existing.pid}, {existing.dashboard_url})")
    for port in (config.gcs_port, config.dashboard_port, config.metrics_export_port):
        if _port_in_use(port):
            raise HeadError(f"port {port} is already in use; choose other ports (see `rayrec cluster start --help`)")
    if config.token_auth:
        ensure_auth_token()
    temp_dir.mkdir(parents=True, exist_ok=True)
    (temp_dir / "ray_current_cluster").unlink(missing_ok=True)  # a previous head's address
    log_file = temp_dir / LOG_FILE
    with open(log_file, "wb") as log:
        process = subprocess.Popen(
            ray_start_command(config, temp_dir),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=_head_environment(config),
            start_new_session=True,  # own process group: `stop` signals only this head's tree
        )
    dashboard_url = f"http://{_connect_host(config.host)}:{config.dashboard_port}"
    try:
        gcs_address = _wait_until_ready(process, temp_dir, dashboard_url, log_file, timeout_s)
    except BaseException:
        _kill_group(process.pid, grace_s=5.0)
        raise
    info = HeadInfo(
        pid=process.pid,
        gcs_address=gcs_address,
        dashboard_url=dashboard_url,
        metrics_url=f"http://{_connect_host(config.host)}:{config.metrics_export_port}/metrics",
        temp_dir=str(temp_dir),
        log_file=str(log_file),
        started_at=time.time(),
        config=asdict(config),
    )
    (temp_dir / STATE_FILE).write_text(json.dumps(asdict(info), indent=2))
    return info


def ensure_auth_token() -> None:
    """Create ``~/.ray/auth_token`` before the head starts, unless a token is already configured.

    The head would create it itself, but only once it is up; creating it first means the
    readiness check in ``start_head`` (a job-API client) is authenticated from its first request.
    """
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return
    if (Path.home() / ".ray" / "auth_token").exists():
        return
    subprocess.run([_ray_executable(), "get-auth-token", "--generate"], capture_output=True, check=True, timeout=60)


def stop_head(temp_dir: Path, grace_s: float = 10.0) -> HeadInfo | None:
    """Stop the head recorded in ``temp_dir``; returns its info, or None if none was recorded."""
    info = read_state(temp_dir)
    if info is None:
        return None
    if _alive(info.pid):
        _kill_group(info.pid, grace_s=grace_s)
    (temp_dir / STATE_FILE).unlink(missing_ok=True)
    return info


def head_status(temp_dir: Path, wait_s: float = 30.0) -> tuple[HeadInfo | None, bool, str]:
    """``(info, alive, resources_report)`` for the head recorded in ``temp_dir``.

    The report is ``ray status`` for that head's GCS address only (never the machine default).
    """
    info = read_state(temp_dir)
    if info is None or not _alive(info.pid):
        return info, False, ""
    env = {**os.environ, **({"RAY_AUTH_MODE": "token"} if info.config.get("token_auth") else {})}
    command = [_ray_executable(), "status", "--address", info.gcs_address]
    deadline = time.monotonic() + wait_s
    while True:
        result = subprocess.run(command, capture_output=True, text=True, timeout=60, env=env, check=False)
        report = (result.stdout + result.stderr).strip()
        # Right after start the autoscaler has not published its first report yet.
        if "No cluster status" not in report or time.monotonic() > deadline:
            return info, True, report
        time.sleep(2.0)


def read_state(temp_dir: Path) -> HeadInfo | None:
    path = Path(temp_dir) / STATE_FILE
    if not path.exists():
        return None
    return HeadInfo(**json.loads(path.read_text()))


def ray_start_command(config: HeadConfig, temp_dir: Path) -> list[str]:
    """The ``ray start`` command line for ``config`` (public so the docs and tests can show it)."""
    command = [
        _ray_executable(),
        "start",
        "--head",
        "--block",
        f"--port={config.gcs_port}",
        "--include-dashboard=true",
        f"--dashboard-host={config.host}",
        f"--dashboard-port={config.dashboard_port}",
        f"--metrics-export-port={config.metrics_export_port}",
        f"--temp-dir={temp_dir}",
        # These two default to fixed ports (10001, 52365) that a second head on the same machine
        # would collide on; free ephemeral ports keep heads independent.
        f"--ray-client-server-port={_free_port()}",
        f"--dashboard-agent-listen-port={_free_port()}",
        "--disable-usage-stats",
    ]
    if config.num_cpus is not None:
        command.append(f"--num-cpus={config.num_cpus}")
    if config.num_gpus is not None:
        command.append(f"--num-gpus={config.num_gpus}")
    if config.resources:
        command.append(f"--resources={json.dumps(config.resources, sort_keys=True)}")
    return command


def _head_environment(config: HeadConfig) -> dict[str, str]:
    env = dict(os.environ)
    # Job entrypoints run with the head's PATH: put this interpreter's bin first so a submitted
    # `python -m cluster.cli ...` finds the same environment the head runs in.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["RAY_AUTH_MODE"] = "token" if config.token_auth else "disabled"
    apply_serve_env(env)  # Serve as rayrec ships it on this head (an operator's own values win)
    return env


def _wait_until_ready(
    process: subprocess.Popen, temp_dir: Path, dashboard_url: str, log_file: Path, timeout_s: float
) -> str:
    """Block until the head answers job-API calls; return its GCS address."""
    from cluster.jobs import client_for

    deadline = time.monotonic() + timeout_s
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise HeadError(f"`ray start` exited with {process.returncode}:\n{_tail(log_file)}")
        address_file = temp_dir / "ray_current_cluster"
        if address_file.exists() and _http_answers(dashboard_url + "/api/version"):
            try:
                client_for(dashboard_url).list_jobs()
                return address_file.read_text().strip()
            except (RuntimeError, OSError) as err:  # the job module comes up a little after the dashboard
                last_error = err
        time.sleep(1.0)
    raise HeadError(f"head not ready after {timeout_s:.0f}s ({last_error}):\n{_tail(log_file)}")


def _kill_group(pgid: int, grace_s: float) -> None:
    """Stop the head's process group: Ray's own shutdown first, then SIGKILL what is left.

    SIGINT to ``ray start --block`` (the group leader) runs Ray's exit handler, which stops
    the GCS, raylet and dashboard in order; its children block SIGINT, and the leader ignores
    SIGTERM while blocking, so those are no use here.
    """
    for signal_to, sig, wait_s in ((os.kill, signal.SIGINT, grace_s), (os.killpg, signal.SIGKILL, 5.0)):
        try:
            signal_to(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if not _group_alive(pgid):
                return
            time.sleep(0.2)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # Members that exited but were not reaped yet (zombies) still count for killpg(0).
    return any(_alive(pid) for pid in _group_members(pgid))


def _group_members(pgid: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getpgid(int(entry.name)) == pgid:
                    members.append(int(entry.name))
            except (ProcessLookupError, PermissionError):
                continue
    return members


def _alive(pid: int) -> bool:
    """True if ``pid`` runs and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _http_answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=2).close()
        return True
    except urllib.error.HTTPError:  # 401/403 under token auth: the server is up
        return True
    except OSError:
        return False


def _port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("0.0.0.0", port))
        except OSError:
            return True
    return False


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _connect_host(bind_host: str) -> str:
    return "127.0.0.1" if bind_host in ("0.0.0.0", "::", "") else bind_host


def _ray_executable() -> str:
    candidate = Path(sys.executable).parent / "ray"
    return str(candidate) if candidate.exists() else "ray"


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
