"""An S3-compatible server on loopback for the object-storage tests (moto in server mode).

Why moto: it installs from PyPI as a Python package (no binary download), speaks the S3 REST
API that ``pyarrow.fs.S3FileSystem`` and Ray Train use, and runs in a thread of the test.
"""

from __future__ import annotations

import os
import socket
from contextlib import contextmanager
from typing import Iterator

BUCKET = "rayrec"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def s3_server(bucket: str = BUCKET) -> Iterator[dict[str, str]]:
    """Start the server, create ``bucket``, and yield the ``AWS_*`` variables that point
    ``training.storage`` (and any S3 client) at it; they are also set in ``os.environ`` while
    the server runs (and put back afterwards)."""
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one access-log line per request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
    }
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1").create_bucket(Bucket=bucket)
        yield env
    finally:
        server.stop()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
