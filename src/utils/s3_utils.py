"""The lake in an S3 bucket (AWS, MinIO, or a test server), written with boto3.

Chunk keys are write-once: a put is conditional (`If-None-Match: *`), so a retry after a
lost response, a restart, or a second writer can never replace an object; the same bytes
again are a no-op. Servers without conditional writes get a HEAD-and-compare instead.
Each object carries its SHA-256 in its metadata for that comparison, and a CRC32 that S3
verifies on upload and botocore verifies on download.

Transient faults (throttling, 5xx, resets, timeouts) are retried twice over: botocore's
standard mode absorbs short blips, and a logged, capped backoff around each call rides
out longer outages. When both give up the error is `RetryableError`: the caller keeps the
chunk pending and tries again on its next poll.
"""

from __future__ import annotations

import base64
import hashlib
import io
import logging
import random
import time
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    FlexibleChecksumError,
    HTTPClientError,
    IncompleteReadError,
    NoCredentialsError,
    PartialCredentialsError,
    ResponseStreamingError,
)
from botocore.exceptions import (
    ConnectionError as BotoConnectionError,
)

from config.config import Settings
from src.errors import LakeError, ObjectConflict, RetryableError
from src.utils.object_store import ObjectStore, _validate_key

log = logging.getLogger(__name__)

T = TypeVar("T")

MB = 1024 * 1024
MULTIPART_THRESHOLD = 8 * MB
SHA_META = "sha256"  # x-amz-meta-sha256
HEALTH_KEY = "_health/writable"

_TRANSIENT_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestLimitExceeded",
    "TooManyRequests",
    "ServiceUnavailable",
    "InternalError",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "OperationAborted",
    "ConditionalRequestConflict",  # a concurrent conditional write is in flight: retry, then compare
}
_TRANSIENT_STATUS = {408, 429, 500, 502, 503, 504}
_TRANSIENT_EXC = (
    BotoConnectionError,
    HTTPClientError,
    IncompleteReadError,
    ResponseStreamingError,
    FlexibleChecksumError,  # a corrupted download: fetch it again
    ConnectionError,
    TimeoutError,
)

# Patched by tests so that backoff does not wait for real.
_sleep = time.sleep


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, ClientError):
        return _code(exc) in _TRANSIENT_CODES or _status(exc) in _TRANSIENT_STATUS
    return isinstance(exc, _TRANSIENT_EXC)


def _brief(exc: BaseException) -> str:
    if isinstance(exc, ClientError):
        return f"{_code(exc) or 'HTTP ' + str(_status(exc))} (HTTP {_status(exc)})"
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": ")


def _crc32_b64(data: bytes) -> str:
    return base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode()


class S3ObjectStore(ObjectStore):
    """The lake in `S3_BUCKET_NAME` (at `S3_ENDPOINT_URL` when set)."""

    def __init__(
        self,
        settings: Settings,
        *,
        attempts: int = 5,
        sdk_attempts: int = 3,
        backoff: float = 1.0,
        max_backoff: float = 20.0,
        connect_timeout: float = 5.0,
        read_timeout: float = 30.0,
        multipart_threshold: int = MULTIPART_THRESHOLD,
    ) -> None:
        if not settings.s3_bucket_name:
            raise LakeError("S3_BUCKET_NAME is not set: the S3 lake needs a bucket")
        self.bucket = settings.s3_bucket_name
        self.region = settings.aws_region
        self.endpoint = settings.s3_endpoint_url
        self.max_workers = settings.max_workers
        self.attempts = max(1, attempts)
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.multipart_threshold = multipart_threshold
        # Flipped off the first time the server answers "not implemented" to If-None-Match.
        self.conditional_writes = True

        session = boto3.session.Session(
            aws_access_key_id=settings.aws_access_key_id.get_secret_value() or None,
            aws_secret_access_key=settings.aws_secret_access_key.get_secret_value() or None,
            region_name=settings.aws_region,
        )
        config = Config(
            region_name=settings.aws_region,
            retries={"total_max_attempts": max(1, sdk_attempts), "mode": "standard"},
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            max_pool_connections=max(10, self.max_workers * (self.max_workers + 1)),
            s3={"addressing_style": "path" if self.endpoint else "auto"},
        )
        self._client = session.client("s3", endpoint_url=self.endpoint, config=config)
        # s3transfer drops IfNoneMatch from its arguments, so the conditional multipart upload
        # goes through a twin client that adds it to every CompleteMultipartUpload.
        self._cond_client = session.client("s3", endpoint_url=self.endpoint, config=config)
        self._cond_client.meta.events.register("provide-client-params.s3.CompleteMultipartUpload", _add_if_none_match)
        self._transfer = TransferConfig(
            multipart_threshold=multipart_threshold,
            multipart_chunksize=max(multipart_threshold, 5 * MB),
            max_concurrency=self.max_workers,
            use_threads=True,
        )

    # -- retries -------------------------------------------------------------------------

    def _retrying(self, op: str, key: str, call: Callable[[], T]) -> T:
        """Run one S3 call, retrying transient faults with a capped, logged backoff."""
        wait = self.backoff
        for attempt in range(1, self.attempts + 1):
            try:
                return call()
            except (NoCredentialsError, PartialCredentialsError):
                raise LakeError(
                    f"no AWS credentials for S3 bucket {self.bucket} (region {self.region}): set "
                    "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or configure the AWS credential chain"
                ) from None
            except (ClientError, BotoCoreError, OSError) as exc:
                if not _is_transient(exc):
                    raise
                if attempt == self.attempts:
                    raise RetryableError(
                        f"S3 {op} s3://{self.bucket}/{key} still failing after {attempt} attempts "
                        f"({_brief(exc)}); will retry on the next poll"
                    ) from exc
                delay = min(wait, self.max_backoff) * (0.5 + random.random() / 2)
                log.warning(
                    "S3 %s s3://%s/%s failed: %s; retry %d/%d in %.1fs",
                    op, self.bucket, key, _brief(exc), attempt, self.attempts - 1, delay,
                )  # fmt: skip
                _sleep(delay)
                wait *= 2
        raise AssertionError("unreachable")

    def _denied(self, op: str, key: str, exc: ClientError, permission: str) -> LakeError:
        return LakeError(
            f"S3 {op} on s3://{self.bucket}/{key} refused ({_brief(exc)}, region {self.region}): "
            f"grant {permission} (see docs/s3.md)"
        )

    # -- writes --------------------------------------------------------------------------

    def put_bytes(self, key: str, data: bytes, *, overwrite: bool = False) -> bool:
        _validate_key(key)
        sha = hashlib.sha256(data).hexdigest()
        if overwrite or not self.conditional_writes:
            same = self._same_content(key, data, sha)
            if same:
                return False
            if same is not None and not overwrite:
                raise self._conflict(key, data)
            self._upload(key, data, sha, conditional=False)
            return True
        try:
            self._upload(key, data, sha, conditional=True)
            return True
        except ClientError as exc:
            if _code(exc) in ("PreconditionFailed", "412") or _status(exc) == 412:
                # Someone (perhaps our own attempt whose answer was lost) wrote it first.
                if self._same_content(key, data, sha):
                    return False
                raise self._conflict(key, data) from None
            if _code(exc) == "NotImplemented" or _status(exc) == 501:
                log.info("S3 endpoint %s has no conditional writes: comparing before each put", self.endpoint)
                self.conditional_writes = False
                return self.put_bytes(key, data, overwrite=overwrite)
            raise

    def put_many(self, items: list[tuple[str, bytes]], *, overwrite: bool = False) -> list[bool]:
        """`put_bytes` for many objects, MAX_WORKERS at a time; results in input order.

        Every item is attempted; the first error (in input order) is raised after all have run,
        so a retry of the whole batch redoes only what failed.
        """
        if not items:
            return []
        with ThreadPoolExecutor(max_workers=min(self.max_workers, len(items)), thread_name_prefix="s3put") as pool:
            futures = [pool.submit(self.put_bytes, key, data, overwrite=overwrite) for key, data in items]
        errors = [f.exception() for f in futures]
        for err in errors:
            if err is not None:
                raise err
        return [f.result() for f in futures]

    def _upload(self, key: str, data: bytes, sha: str, *, conditional: bool) -> None:
        if len(data) > self.multipart_threshold:
            client = self._cond_client if conditional else self._client
            extra = {"Metadata": {SHA_META: sha}, "ChecksumAlgorithm": "CRC32"}

            def call() -> None:
                client.upload_fileobj(io.BytesIO(data), self.bucket, key, ExtraArgs=extra, Config=self._transfer)
        else:
            args = {
                "Bucket": self.bucket,
                "Key": key,
                "Body": data,
                "ChecksumAlgorithm": "CRC32",
                "ChecksumCRC32": _crc32_b64(data),
                "Metadata": {SHA_META: sha},
            }
            if conditional:
                args["IfNoneMatch"] = "*"

            def call() -> None:
                self._client.put_object(**args)

        try:
            self._retrying("put", key, call)
        except ClientError as exc:
            if _code(exc) in ("AccessDenied", "Forbidden", "403") or _status(exc) == 403:
                raise self._denied("put", key, exc, f"s3:PutObject on arn:aws:s3:::{self.bucket}/*") from None
            if _code(exc) == "NoSuchBucket":
                raise self._no_bucket() from None
            raise

    def _same_content(self, key: str, data: bytes, sha: str) -> bool | None:
        """True/False when `key` exists with the same/different bytes; None when absent."""
        try:
            head = self._retrying("head", key, lambda: self._client.head_object(Bucket=self.bucket, Key=key))
        except ClientError as exc:
            if _status(exc) == 404 or _code(exc) in ("404", "NoSuchKey", "NotFound"):
                return None
            if _status(exc) == 403:
                raise self._denied("head", key, exc, f"s3:GetObject on arn:aws:s3:::{self.bucket}/*") from None
            raise
        stored = head.get("Metadata", {}).get(SHA_META)
        if stored:
            return stored == sha
        etag = head.get("ETag", "").strip('"')
        if etag and "-" not in etag:
            return etag == hashlib.md5(data).hexdigest()
        return self.get_bytes(key) == data  # written by another tool, multipart: compare the bytes

    def _conflict(self, key: str, data: bytes) -> ObjectConflict:
        return ObjectConflict(
            f"lake object s3://{self.bucket}/{key} already exists with different content "
            f"(new sha256 {hashlib.sha256(data).hexdigest()[:16]}...); not overwritten"
        )

    def _no_bucket(self) -> LakeError:
        where = f" at {self.endpoint}" if self.endpoint else ""
        return LakeError(
            f"S3 bucket {self.bucket} does not exist (region {self.region}{where}): create it or fix S3_BUCKET_NAME"
        )

    # -- reads ---------------------------------------------------------------------------

    def get_bytes(self, key: str) -> bytes:
        _validate_key(key)

        def call() -> bytes:
            resp = self._client.get_object(Bucket=self.bucket, Key=key, ChecksumMode="ENABLED")
            return resp["Body"].read()

        try:
            return self._retrying("get", key, call)
        except ClientError as exc:
            if _code(exc) in ("NoSuchKey", "404") or _status(exc) == 404:
                raise FileNotFoundError(f"s3://{self.bucket}/{key}") from None
            if _status(exc) == 403:
                raise self._denied("get", key, exc, f"s3:GetObject on arn:aws:s3:::{self.bucket}/*") from None
            raise

    def exists(self, key: str) -> bool:
        _validate_key(key)
        try:
            self._retrying("head", key, lambda: self._client.head_object(Bucket=self.bucket, Key=key))
            return True
        except ClientError as exc:
            if _status(exc) == 404 or _code(exc) in ("404", "NoSuchKey", "NotFound"):
                return False
            if _status(exc) == 403:
                raise self._denied("head", key, exc, f"s3:GetObject on arn:aws:s3:::{self.bucket}/*") from None
            raise

    def list_keys(self, prefix: str) -> Iterator[str]:
        """Every key under `prefix`, one page (up to 1,000 keys) per request, each page retried."""
        token: str | None = None
        page = 0
        while True:
            args = {"Bucket": self.bucket, "Prefix": prefix}
            if token:
                args["ContinuationToken"] = token
            page += 1
            try:
                resp = self._retrying(f"list (page {page})", prefix, lambda a=args: self._client.list_objects_v2(**a))
            except ClientError as exc:
                if _status(exc) == 403:
                    raise self._denied("list", prefix, exc, f"s3:ListBucket on arn:aws:s3:::{self.bucket}") from None
                if _code(exc) == "NoSuchBucket":
                    raise self._no_bucket() from None
                raise
            for item in resp.get("Contents", []):
                yield item["Key"]
            if not resp.get("IsTruncated"):
                return
            token = resp["NextContinuationToken"]

    def delete(self, key: str) -> None:
        _validate_key(key)
        try:
            self._retrying("delete", key, lambda: self._client.delete_object(Bucket=self.bucket, Key=key))
        except ClientError as exc:
            if _status(exc) == 403:
                raise self._denied("delete", key, exc, f"s3:DeleteObject on arn:aws:s3:::{self.bucket}/*") from None
            raise

    # -- identity ------------------------------------------------------------------------

    def spark_uri(self, key: str) -> str:
        key = key.strip("/")
        return f"s3a://{self.bucket}/{key}" if key else f"s3a://{self.bucket}/"

    def describe(self) -> str:
        where = f"endpoint {self.endpoint}" if self.endpoint else "AWS"
        return f"S3 lake s3://{self.bucket} (region {self.region}, {where})"

    def check_writable(self) -> None:
        """Fail fast, in one line naming bucket, region and permission, when the lake is unusable.

        Needs only the permissions the daemon needs (ListBucket, PutObject, GetObject): the
        probe object is overwritten on every start rather than deleted.
        """
        try:
            self._retrying("head-bucket", "", lambda: self._client.head_bucket(Bucket=self.bucket))
        except ClientError as exc:
            status = _status(exc)
            if status == 404 or _code(exc) in ("NoSuchBucket", "404"):
                raise self._no_bucket() from None
            if status == 403:
                raise self._denied("head-bucket", "", exc, f"s3:ListBucket on arn:aws:s3:::{self.bucket}") from None
            if status == 301:
                actual = exc.response.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("x-amz-bucket-region")
                raise LakeError(
                    f"S3 bucket {self.bucket} is in region {actual or 'another region'}, not AWS_REGION={self.region}"
                ) from None
            raise LakeError(f"S3 bucket {self.bucket} (region {self.region}) cannot be used: {_brief(exc)}") from None
        except BotoCoreError as exc:
            raise LakeError(
                f"S3 bucket {self.bucket} (region {self.region}) unreachable at {self.endpoint or 'AWS'}: {_brief(exc)}"
            ) from None
        stamp = f"ok {time.time():.0f}\n".encode()
        self._upload(HEALTH_KEY, stamp, hashlib.sha256(stamp).hexdigest(), conditional=False)
        self.get_bytes(HEALTH_KEY)


def _add_if_none_match(params: dict, **_: object) -> None:
    params["IfNoneMatch"] = "*"
