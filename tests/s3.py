"""An S3-compatible server for tests (moto's server, in a subprocess on 127.0.0.1) and helpers to fill its buckets.

A subprocess rather than moto's in-process ``ThreadedMotoServer``: pytest turns warnings into errors, and a
warning raised in an in-process server thread would come back to the client as a 500; a process of its own
also keeps the server's Python work off the GIL that zarr's event loop and the tests share.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from urllib.parse import urlparse

import pytest

__all__ = ["KEY_ID", "REGION", "SECRET", "MotoServer", "free_port", "make_bucket", "s3_env", "upload_tree"]

# Dummy credentials (moto accepts any); the secret is distinctive so leak tests can search for it.
KEY_ID = "scvi-scale-test-key-id"
SECRET = "scvi-scale-test-secret-do-not-print"
REGION = "us-east-1"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class MotoServer:
    """``moto.server`` on 127.0.0.1 and a free port; :meth:`stop` ends it (also usable as a context manager)."""

    def __init__(self, start_timeout_s: float = 60.0) -> None:
        self._log = tempfile.NamedTemporaryFile(prefix="moto-", suffix=".log", delete=False)
        for _ in range(3):  # another process may take the port between choosing and binding it
            self.port = free_port()
            self.endpoint = f"http://127.0.0.1:{self.port}"
            self._proc = subprocess.Popen(
                [sys.executable, "-c", "from moto.server import main; main()", "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=self._log,
                stderr=subprocess.STDOUT,
            )
            if self._wait_ready(start_timeout_s):
                return
            self._stop_process()
        raise RuntimeError(f"moto server did not start; its log:\n{self._log_tail()}")

    def _wait_ready(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=2):
                    return True
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.1)
        return False

    def _log_tail(self) -> str:
        return Path(self._log.name).read_text(errors="replace")[-2000:]

    def _stop_process(self) -> None:
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=10)

    def stop(self) -> None:
        self._stop_process()
        self._log.close()
        Path(self._log.name).unlink(missing_ok=True)

    def __enter__(self) -> MotoServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def point_env_at(mp: pytest.MonkeyPatch, endpoint: str) -> None:
    """Set (through ``mp``) the environment of :func:`s3_env`, unsetting what it says to unset."""
    for name, value in s3_env(endpoint).items():
        if value is None:
            mp.delenv(name, raising=False)
        else:
            mp.setenv(name, value)


def s3_env(endpoint: str) -> dict[str, str | None]:
    """Environment for the test server: endpoint, dummy keys, region; ``None`` means unset.

    Other AWS settings a developer's shell may carry (profiles, session tokens, config files, instance metadata)
    are switched off so that they cannot redirect the tests to real credentials.
    """
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": KEY_ID,
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_REGION": REGION,
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "AWS_ENDPOINT_URL_S3": None,
        "S3_ENDPOINT_URL": None,
        "AWS_SESSION_TOKEN": None,
        "AWS_PROFILE": None,
    }


def _client(endpoint: str):
    import boto3

    return boto3.client(
        "s3", endpoint_url=endpoint, aws_access_key_id=KEY_ID, aws_secret_access_key=SECRET, region_name=REGION
    )


def make_bucket(endpoint: str, prefix: str = "test") -> str:
    """Create a bucket with a fresh name; return its ``s3://`` URL."""
    name = f"{prefix}-{uuid.uuid4().hex[:12]}"
    _client(endpoint).create_bucket(Bucket=name)
    return f"s3://{name}"


def upload_tree(local_dir: str | os.PathLike[str], url: str, endpoint: str) -> str:
    """Copy a local directory tree (a Zarr or TileDB store) to ``s3://bucket/prefix``; return ``url``."""
    parsed = urlparse(url)
    bucket, prefix = parsed.netloc, parsed.path.strip("/")
    client, root = _client(endpoint), Path(local_dir)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        key = "/".join(filter(None, [prefix, path.relative_to(root).as_posix()]))
        client.upload_file(str(path), bucket, key)
    return url
