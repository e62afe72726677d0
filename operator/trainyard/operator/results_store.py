"""Reading an evaluation's eval.json from where the workload wrote it: file:// or s3://.

The only place the operator reads object storage. S3 goes through boto3 in a thread
(boto3 blocks), with the operator's own credentials (boto3's default chain: AWS_*
variables, IRSA, instance roles) and endpoint (`endpoint` when the judged run names
one, else AWS_ENDPOINT_URL, which boto3 reads itself).

A missing eval.json is an answer (`ResultsRead.results is None`, with why); a storage
that cannot be reached, or refuses, raises `ResultsUnavailable`, so the reconcile is
retried with backoff instead of failing the gate on a network blip.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from pydantic import ValidationError

from trainyard.api.verdict import EvalResults

READ_TIMEOUT = 20.0  # seconds one read may take, connect and retries included
MAX_BYTES = 64 * 1024 * 1024  # eval.json with per-example samples of a large evaluation


class ResultsUnavailable(Exception):
    """The storage could not be asked (unreachable, refused, timed out): try again later."""


@dataclass(frozen=True)
class ResultsRead:
    uri: str
    results: EvalResults | None
    problem: str | None = None
    """Why there are no results: absent, or not an eval.json."""


def parse_results(uri: str, raw: bytes | None) -> ResultsRead:
    """The parsed eval.json, or why not.

    >>> parse_results("file:///x/eval.json", None).problem
    'no eval.json at file:///x/eval.json'
    >>> parse_results("file:///x/eval.json", b"{").problem.startswith("eval.json is not JSON")
    True
    """
    if raw is None:
        return ResultsRead(uri, None, f"no eval.json at {uri}")
    try:
        document = json.loads(raw)
    except ValueError as error:
        return ResultsRead(uri, None, f"eval.json is not JSON: {error}")
    try:
        return ResultsRead(uri, EvalResults.model_validate(document))
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "(document)"
        return ResultsRead(uri, None, f"eval.json is not valid: {where}: {first.get('msg')}")


async def read_results(uri: str, *, endpoint: str | None = None) -> ResultsRead:
    """eval.json at `uri` (file:// or s3://), read off the event loop."""
    scheme = urlparse(uri).scheme
    if scheme == "file":
        raw = await asyncio.to_thread(_read_file, uri)
    elif scheme == "s3":
        try:
            raw = await asyncio.wait_for(asyncio.to_thread(_read_s3, uri, endpoint), READ_TIMEOUT)
        except TimeoutError:
            raise ResultsUnavailable(f"{uri}: no answer within {READ_TIMEOUT:g}s") from None
    else:
        return ResultsRead(uri, None, f"{uri}: eval.json is read from s3:// or file:// only")
    return parse_results(uri, raw)


def _read_file(uri: str) -> bytes | None:
    path = Path(unquote(urlparse(uri).path))
    try:
        with path.open("rb") as handle:
            return handle.read(MAX_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as error:
        raise ResultsUnavailable(f"{uri}: {error}") from None


def _read_s3(uri: str, endpoint: str | None) -> bytes | None:
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError

    parsed = urlparse(uri)
    bucket, key = parsed.netloc, parsed.path.lstrip("/")
    options: dict[str, Any] = {
        "config": Config(
            connect_timeout=5, read_timeout=10, retries={"max_attempts": 2, "mode": "standard"}
        )
    }
    if endpoint:
        options["endpoint_url"] = endpoint
    s3 = boto3.session.Session().client("s3", **options)
    try:
        answer = s3.get_object(Bucket=bucket, Key=key)
        return answer["Body"].read(MAX_BYTES + 1)
    except ClientError as error:
        code = str(error.response.get("Error", {}).get("Code", ""))
        if code in ("NoSuchKey", "404", "NotFound"):
            return None
        raise ResultsUnavailable(f"{uri}: {code or error}") from None
    except BotoCoreError as error:
        raise ResultsUnavailable(f"{uri}: {error}") from None
