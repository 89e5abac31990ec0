"""An S3-compatible bucket (AWS S3, MinIO, SeaweedFS, Ceph...) as a store.

Configuration is the standard AWS one, so operators reuse what they already have:
credentials from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, AWS_PROFILE
or an instance role; the endpoint of a non-AWS server from AWS_ENDPOINT_URL_S3 or
AWS_ENDPOINT_URL; the region from AWS_REGION / AWS_DEFAULT_REGION (us-east-1 if unset).

Atomicity: one PUT of the whole object is atomic on S3. `create_only=True` sends
`If-None-Match: *`, so the server refuses to overwrite an existing key (412) and exactly one
of several racing writers wins. A server that ignores the header would silently
overwrite; `fedcli check-store` (store.check_create_only) detects that (docs/operations.md).

botocore's own retries are switched off: retries happen once, in `retry.with_retry`, where
they are bounded and logged.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from typing import TypeVar

import boto3
import botocore.exceptions as bex
from botocore.config import Config

from fedcli.errors import AlreadyExists, FedcliError, NotFound, Oversize, StoreError
from fedcli.names import check_key
from fedcli.store import retry
from fedcli.store.base import Store
from fedcli.store.retry import RetryPolicy, describe, with_retry

T = TypeVar("T")

_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
# Error codes worth another try: throttling, server trouble, and AWS's answer to two
# conditional writes arriving at once (409: retry, and one of them then gets 412).
_TRANSIENT_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestTimeout",
    "InternalError",
    "ServiceUnavailable",
    "OperationAborted",
    "ConditionalRequestConflict",
}
_DENIED_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "Forbidden", "403"}
_MISSING_CODES = {"NoSuchKey", "NotFound", "404"}


def _code(e: bex.ClientError) -> str:
    return str(e.response.get("Error", {}).get("Code", ""))


def _status(e: bex.ClientError) -> int:
    return int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)


def is_transient(e: BaseException) -> bool:
    """True for errors that may go away by themselves: network, timeouts, 5xx, throttling."""
    if isinstance(e, bex.SSLError):
        return False  # a certificate problem does not fix itself
    if isinstance(e, (bex.ConnectionError, bex.HTTPClientError, bex.IncompleteReadError)):
        return True
    if isinstance(e, (bex.ChecksumError, bex.FlexibleChecksumError)):
        return True  # corrupted in transit: fetch again
    if isinstance(e, bex.ClientError):
        return _status(e) >= 500 or _code(e) in _TRANSIENT_CODES or _status(e) == 429
    return False


class S3Store(Store):
    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        client=None,
        policy: RetryPolicy | None = None,
    ):
        if not _BUCKET.match(bucket):
            raise FedcliError(f"invalid S3 bucket name {bucket!r}")
        prefix = prefix.strip("/")
        if prefix:
            check_key(prefix)
        self.bucket = bucket
        self.prefix = prefix
        self.url = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
        self.policy = policy or retry.DEFAULT_POLICY  # looked up now, so tests and tools can tune it
        self.client = client if client is not None else make_client()

    @classmethod
    def from_url(cls, url: str, *, policy: RetryPolicy | None = None) -> S3Store:
        """`s3://bucket` or `s3://bucket/some/prefix`, configured from the AWS environment."""
        if not url.startswith("s3://"):
            raise FedcliError(f"not an S3 URL: {url!r} (expected s3://bucket/prefix)")
        bucket, _, prefix = url[len("s3://") :].partition("/")
        return cls(bucket, prefix, policy=policy)

    # -- helpers -----------------------------------------------------------------

    def _key(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _call(self, what: str, key: str, op: Callable[[], T]) -> T:
        """Run one S3 operation with retries, turning botocore errors into fedcli errors."""
        where = f"{self.url}/{key}" if key else self.url

        def attempt() -> T:
            try:
                return op()
            except bex.NoCredentialsError:
                raise StoreError(
                    f"no S3 credentials for {self.url}: set AWS_ACCESS_KEY_ID and "
                    "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)"
                ) from None
            except bex.ClientError as e:
                if is_transient(e):
                    raise
                code = _code(e)
                if code == "PreconditionFailed" or _status(e) == 412:
                    raise AlreadyExists(f"{key} already exists in {self.url}") from None
                if code == "NoSuchBucket":
                    raise StoreError(f"bucket {self.bucket!r} does not exist ({self.url})") from None
                if code in _MISSING_CODES or _status(e) == 404:
                    raise NotFound(f"{key} not found in {self.url}") from None
                if code in _DENIED_CODES or _status(e) == 403:
                    raise StoreError(
                        f"access denied to {where} ({code}): check AWS_ACCESS_KEY_ID, "
                        "AWS_SECRET_ACCESS_KEY and the bucket policy"
                    ) from None
                raise StoreError(f"cannot {what} {where}: {describe(e)}") from None
            except bex.BotoCoreError as e:
                if is_transient(e):
                    raise
                raise StoreError(f"cannot {what} {where}: {describe(e)}") from None

        return with_retry(attempt, what=f"{what} {where}", transient=is_transient, policy=self.policy)

    # -- Store interface ---------------------------------------------------------

    def get(self, key: str, *, max_bytes: int) -> bytes:
        k = self._key(key)

        def op() -> bytes:
            resp = self.client.get_object(Bucket=self.bucket, Key=k)
            with resp["Body"] as body:
                size = int(resp.get("ContentLength", 0))
                if size > max_bytes:
                    raise Oversize(
                        f"{key} in {self.url} is {size:,} bytes, more than the {max_bytes:,} allowed; not read"
                    )
                data = body.read(max_bytes + 1)
            if len(data) > max_bytes:
                raise Oversize(f"{key} in {self.url} is larger than the {max_bytes:,} bytes allowed; not read")
            return data

        return self._call("read", key, op)

    def put(self, key: str, data: bytes, *, create_only: bool = False) -> None:
        k = self._key(key)
        tries = 0

        def op() -> None:
            nonlocal tries
            tries += 1
            extra = {"IfNoneMatch": "*"} if create_only else {}
            self.client.put_object(Bucket=self.bucket, Key=k, Body=data, **extra)

        try:
            self._call("write", key, op)
        except AlreadyExists:
            # An earlier attempt may have succeeded with its answer lost; if the object
            # holds exactly our bytes, that attempt was ours and the write is done.
            if tries > 1 and self._same(key, data):
                return
            raise

    def _same(self, key: str, data: bytes) -> bool:
        try:
            return self.get(key, max_bytes=len(data)) == data
        except Oversize:
            return False
        except NotFound:
            return False

    def exists(self, key: str) -> bool:
        try:
            self.size(key)
            return True
        except NotFound:
            return False

    def size(self, key: str) -> int:
        k = self._key(key)
        head = self._call("inspect", key, lambda: self.client.head_object(Bucket=self.bucket, Key=k))
        return int(head["ContentLength"])

    def list(self, prefix: str = "") -> list[str]:
        prefix = prefix.rstrip("/")
        full = self._key(prefix) + "/" if prefix else (self.prefix + "/" if self.prefix else "")
        skip = len(self.prefix) + 1 if self.prefix else 0

        def op() -> list[str]:
            keys = []
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full)
            for page in pages:
                for obj in page.get("Contents", []):
                    rel = obj["Key"][skip:]
                    try:
                        keys.append(check_key(rel))
                    except FedcliError:
                        continue  # not a name fedcli writes (e.g. a folder marker): ignore
            return sorted(keys)

        return self._call("list", prefix, op)

    def delete(self, key: str) -> None:
        k = self._key(key)
        try:
            self._call("delete", key, lambda: self.client.delete_object(Bucket=self.bucket, Key=k))
        except NotFound:
            pass


def make_client():
    """An S3 client from the standard AWS environment, with our timeouts and no hidden retries."""
    session = boto3.session.Session()
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    config = Config(
        connect_timeout=10,
        read_timeout=60,
        retries={"total_max_attempts": 1},
        # Self-hosted servers (MinIO, SeaweedFS) expect bucket names in the path.
        s3={"addressing_style": "path"} if endpoint else None,
    )
    return session.client("s3", region_name=session.region_name or "us-east-1", config=config)
