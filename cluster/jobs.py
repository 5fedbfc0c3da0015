"""Watch and manage submitted jobs: ``rayrec jobs list|status|logs [-f]|stop`` and ``submit --follow``.

Thin over ``ray.job_submission.JobSubmissionClient``; what rayrec adds is the exit-code rule a
script can rely on: following a job returns 0 only if it SUCCEEDED.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import TextIO

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def client_for(address: str):
    """A ``JobSubmissionClient`` for ``address`` that sends the auth token when one exists."""
    from cluster.auth import enable_client_token_auth

    enable_client_token_auth()
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address)


def follow(address: str, submission_id: str, out: TextIO | None = None) -> int:
    """Stream the job's logs until it ends; 0 if it SUCCEEDED, 1 otherwise (reason on stderr)."""
    out = out or sys.stdout
    client = client_for(address)

    async def stream() -> None:
        async for chunk in client.tail_job_logs(submission_id):
            out.write(chunk)
            out.flush()

    asyncio.run(stream())
    status = wait_for_terminal(client, submission_id)
    info = client.get_job_info(submission_id)
    if status == "SUCCEEDED":
        print(f"job {submission_id} SUCCEEDED", file=sys.stderr)
        return 0
    print(f"job {submission_id} {status}: {info.message or ''}".rstrip(), file=sys.stderr)
    return 1


def wait_for_terminal(client, submission_id: str, timeout_s: float = 60.0) -> str:
    """The log stream can end a moment before the status flips; poll until it is terminal."""
    deadline = time.monotonic() + timeout_s
    status = str(client.get_job_status(submission_id).value)
    while status not in TERMINAL and time.monotonic() < deadline:
        time.sleep(0.5)
        status = str(client.get_job_status(submission_id).value)
    return status


def list_jobs(address: str, out: TextIO | None = None) -> int:
    """One line per job, newest first: id, status, start time (UTC), entrypoint."""
    out = out or sys.stdout
    jobs = client_for(address).list_jobs()
    jobs.sort(key=lambda job: job.start_time or 0, reverse=True)
    out.write(f"{'SUBMISSION ID':<48} {'STATUS':<10} {'STARTED (UTC)':<20} ENTRYPOINT\n")
    for job in jobs:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(job.start_time / 1000)) if job.start_time else "-"
        entrypoint = job.entrypoint if len(job.entrypoint) <= 80 else job.entrypoint[:77] + "..."
        out.write(f"{job.submission_id or job.job_id:<48} {job.status.value:<10} {started:<20} {entrypoint}\n")
    return 0


def job_status(address: str, submission_id: str, out: TextIO | None = None) -> int:
    """Print the job's info as JSON (status, message, metadata, times); 0 if it exists."""
    out = out or sys.stdout
    info = client_for(address).get_job_info(submission_id)
    fields = {
        "submission_id": info.submission_id,
        "status": info.status.value,
        "message": info.message,
        "entrypoint": info.entrypoint,
        "metadata": info.metadata,
        "start_time": info.start_time,
        "end_time": info.end_time,
        "driver_exit_code": getattr(info, "driver_exit_code", None),
    }
    out.write(json.dumps(fields, indent=2) + "\n")
    return 0


def job_logs(address: str, submission_id: str, follow_logs: bool, out: TextIO | None = None) -> int:
    """Print the logs so far, or follow them (then the exit code is the job's, as in ``follow``)."""
    out = out or sys.stdout
    if follow_logs:
        return follow(address, submission_id, out)
    out.write(client_for(address).get_job_logs(submission_id))
    return 0


def stop_job(address: str, submission_id: str, out: TextIO | None = None) -> int:
    """Ask the cluster to stop the job; 0 if a running job was told to stop."""
    out = out or sys.stdout
    stopped = client_for(address).stop_job(submission_id)
    out.write(f"{submission_id}: {'stop requested' if stopped else 'not running'}\n")
    return 0 if stopped else 1
