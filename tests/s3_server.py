"""An S3 API for the tests: moto's server (`moto[server]`) in a process of its own on a free loopback
port. No S3 service is reachable from here; the real s3fs client talks HTTP to this one, as it would
to AWS or MinIO, and nothing of boto or s3fs is patched."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from spider.errors import SpiderError
from spider.local import free_port, terminate, wait_http

# moto accepts any credentials; s3fs must find some, as on a real deployment.
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "spider-tests", "AWS_SECRET_ACCESS_KEY": "spider-tests-secret",
               "AWS_DEFAULT_REGION": "us-east-1"}


@dataclass
class S3Server:
    """A running S3 API at `url`; `env` is what a process needs to use it (credentials, and the
    operator setting SPIDER_S3_ENDPOINT_URL)."""

    url: str

    @property
    def env(self) -> dict[str, str]:
        return {**CREDENTIALS, "SPIDER_S3_ENDPOINT_URL": self.url}

    def new_bucket(self) -> str:
        """A fresh, empty bucket's name."""
        import boto3

        name = f"spider-{uuid.uuid4().hex[:12]}"
        client = boto3.client("s3", endpoint_url=self.url, aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                              aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")
        client.create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        """Every key in `bucket` under `prefix`, read straight from the API."""
        import boto3

        client = boto3.client("s3", endpoint_url=self.url, aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                              aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(item["Key"] for page in pages for item in page.get("Contents", []))


@contextlib.contextmanager
def s3_server(log_dir: Path) -> Iterator[S3Server]:
    """moto's S3 server until the block ends."""
    port = free_port()
    log = open(log_dir / "moto.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()

    def alive() -> None:
        if proc.poll() is not None:
            raise SpiderError(f"moto's server exited with {proc.returncode}: {(log_dir / 'moto.log').read_text()[-2000:]}")

    try:
        wait_http(f"http://127.0.0.1:{port}/moto-api/", alive, 60.0, "moto's S3 server")
        yield S3Server(f"http://127.0.0.1:{port}")
    finally:
        terminate([proc], grace=5)


@contextlib.contextmanager
def s3_with_credentials(log_dir: Path) -> Iterator[S3Server]:
    """moto's S3 server, with the credentials s3fs reads set in this process's environment
    meanwhile (and restored after)."""
    import os

    saved = {name: os.environ.get(name) for name in CREDENTIALS}
    os.environ.update(CREDENTIALS)
    try:
        with s3_server(log_dir) as server:
            yield server
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
