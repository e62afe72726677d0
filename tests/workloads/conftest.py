"""Shared fixtures for workload tests: a real moto S3 server over HTTP.

`s3_endpoint` (session) starts `python -m moto.server` on 127.0.0.1 with a free port;
`s3_bucket` creates a fresh bucket on it for one test. boto3 clients made anywhere in
the test process find the dummy credentials and region in the environment.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid

import pytest

DUMMY_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    # Never fall through to a real profile or the instance-metadata endpoint.
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_EC2_METADATA_DISABLED": "true",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_http(url: str, process: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"moto server exited with {process.returncode}")
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"moto server did not answer at {url} within {timeout}s")


def start_moto_server() -> tuple[subprocess.Popen, str]:
    """Start moto's standalone server; returns the process and its endpoint URL."""
    for _ in range(3):  # another process may grab the free port before moto binds it
        port = free_port()
        process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        endpoint = f"http://127.0.0.1:{port}"
        try:
            wait_for_http(f"{endpoint}/moto-api/", process)
            return process, endpoint
        except RuntimeError:
            process.kill()
            process.wait()
    raise RuntimeError("could not start moto server")


@pytest.fixture(scope="session", autouse=True)
def dummy_aws_env():
    saved = {k: os.environ.get(k) for k in DUMMY_AWS_ENV}
    os.environ.update(DUMMY_AWS_ENV)
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def s3_endpoint(dummy_aws_env) -> str:
    process, endpoint = start_moto_server()
    yield endpoint
    process.terminate()
    process.wait(timeout=10)


@pytest.fixture
def s3_bucket(s3_endpoint) -> str:
    """A fresh, empty bucket on the moto server; its name."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=name)
    return name
