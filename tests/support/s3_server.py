"""A local S3-compatible server (moto's server mode) for the staging tests: real HTTP, real S3
protocol, nothing mocked in the client. Started and stopped by the test that needs it."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from support.processes import stop_process_group

# moto accepts any credentials; these only have to be present and are never real.
KEY, SECRET = "mailroom-test-key", "mailroom-test-secret"


@dataclass(frozen=True)
class S3Server:
    endpoint_url: str
    bucket: str

    @property
    def storage_options(self) -> dict[str, Any]:
        return {"key": KEY, "secret": SECRET, "endpoint_url": self.endpoint_url}

    def url(self, prefix: str) -> str:
        return f"s3://{self.bucket}/{prefix.strip('/')}"

    def filesystem(self) -> Any:
        import s3fs

        return s3fs.S3FileSystem(
            **self.storage_options, skip_instance_cache=True, use_listings_cache=False
        )

    def keys(self, prefix: str = "") -> dict[str, int]:
        """Every object under ``prefix`` of the bucket: key (relative to it) → size."""
        base = f"{self.bucket}/{prefix.strip('/')}".rstrip("/")
        found = self.filesystem().find(base, detail=True)
        return {name[len(base) + 1 :]: int(info["size"]) for name, info in found.items()}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def threaded_s3_server() -> Iterator[S3Server]:
    """moto's server in a thread of this process, with a fresh bucket."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        s3 = S3Server(f"http://{host}:{port}", f"mailroom-{uuid.uuid4().hex[:10]}")
        s3.filesystem().mkdir(s3.bucket)
        yield s3
    finally:
        server.stop()


@contextmanager
def s3_server_process(log_file: Path) -> Iterator[S3Server]:
    """moto's server as a process of its own (``moto_server``), with a fresh bucket; the
    process and everything under it are stopped on exit."""
    port = _free_port()
    with log_file.open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        endpoint = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                requests.get(f"{endpoint}/moto-api/", timeout=2)
                break
            except requests.ConnectionError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"moto_server did not start on port {port}: see {log_file}"
                    ) from None
                time.sleep(0.2)
        s3 = S3Server(endpoint, f"mailroom-{uuid.uuid4().hex[:10]}")
        s3.filesystem().mkdir(s3.bucket)
        yield s3
    finally:
        stop_process_group(proc)
