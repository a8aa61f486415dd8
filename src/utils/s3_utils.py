"""The lake in an S3 bucket (AWS, MinIO, or a test server), written with boto3.

Chunk keys are write-once: a put is conditional (`If-None-Match: *`), so a retry after a
lost response, a restart, or a second writer can never replace an object; the same bytes
again are a no-op. Servers without conditional writes get a HEAD-and-compare instead.
Each object carries its SHA-256 in its metadata for that comparison, and a CRC32 that S3
verifies on upload and botocore verifies on download.

Transient faults (throttling, 5xx, resets, timeouts) are waited out by the product's one retry
policy (`src.utils.retry.call_with_retry`), once per public operation: botocore's own retries are
off (one HTTP request per call), so nothing multiplies a request. An outage of any length only
delays the work; when the worker is stopping, the wait ends with `RetryableError` (not done, try
again later). What waiting cannot fix (access denied, no such bucket, a conflicting object) is
raised at once as `LakeError`/`ObjectConflict`, in one line naming bucket, region and permission.
"""

from __future__ import annotations

import base64
import hashlib
import io
import logging
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import (
    ClientError,
    FlexibleChecksumError,
    IncompleteReadError,
    NoCredentialsError,
    PartialCredentialsError,
)

from config.config import Settings, redact_url
from src.errors import LakeError, ObjectConflict, RetryableError, is_retryable
from src.utils.lake_paths import validate_key
from src.utils.object_store import ObjectStore
from src.utils.retry import brief, call_with_retry

log = logging.getLogger(__name__)

T = TypeVar("T")

MB = 1024 * 1024
MULTIPART_THRESHOLD = 8 * MB
SHA_META = "sha256"  # x-amz-meta-sha256
HEALTH_KEY = "_health/writable"
CONNECT_TIMEOUT = 5.0
READ_TIMEOUT = 30.0

GET_PERMISSION = "s3:GetObject on arn:aws:s3:::{bucket}/*"
PUT_PERMISSION = "s3:PutObject on arn:aws:s3:::{bucket}/*"
LIST_PERMISSION = "s3:ListBucket on arn:aws:s3:::{bucket}"
DELETE_PERMISSION = "s3:DeleteObject on arn:aws:s3:::{bucket}/*"


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)


def _missing(exc: ClientError) -> bool:
    return _status(exc) == 404 or _code(exc) in ("404", "NoSuchKey", "NotFound")


def _retryable(exc: BaseException) -> bool:
    """`is_retryable`, plus what only an S3 client meets: a body cut short or corrupted on the way (fetch it
    again) and a concurrent conditional write still in flight (retry, then compare)."""
    if isinstance(exc, (IncompleteReadError, FlexibleChecksumError)):
        return True
    if isinstance(exc, ClientError) and _code(exc) == "ConditionalRequestConflict":
        return True
    return is_retryable(exc)


def _crc32_b64(data: bytes) -> str:
    return base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode()


class S3ObjectStore(ObjectStore):
    """The lake in `S3_BUCKET_NAME` (at `S3_ENDPOINT_URL` when set).

    `stop` ends a wait for S3 (the worker is stopping); `give_up_after` (seconds) bounds it, for tools
    and tests that must not wait for ever. Either way the operation then raises `RetryableError`.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        stop: threading.Event | None = None,
        give_up_after: float | None = None,
        connect_timeout: float = CONNECT_TIMEOUT,
        read_timeout: float = READ_TIMEOUT,
        multipart_threshold: int = MULTIPART_THRESHOLD,
    ) -> None:
        if not settings.s3_bucket_name:
            raise LakeError("S3_BUCKET_NAME is not set: the S3 lake needs a bucket")
        self.bucket = settings.s3_bucket_name
        self.region = settings.aws_region
        self.endpoint = settings.s3_endpoint_url
        self.max_workers = settings.max_workers
        self.stop = stop
        self.give_up_after = give_up_after
        self.multipart_threshold = multipart_threshold
        self.target = (
            f"{redact_url(self.endpoint).rstrip('/')}/{self.bucket}" if self.endpoint else f"s3://{self.bucket}"
        )
        # Flipped off the first time the server answers "not implemented" to If-None-Match.
        self.conditional_writes = True

        session = boto3.session.Session(
            aws_access_key_id=settings.aws_access_key_id.get_secret_value() or None,
            aws_secret_access_key=settings.aws_secret_access_key.get_secret_value() or None,
            region_name=settings.aws_region,
        )
        config = Config(
            region_name=settings.aws_region,
            # One HTTP request per call: the waiting is done once, by call_with_retry, never nested.
            retries={"total_max_attempts": 1, "mode": "standard"},
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

    # -- the one retry layer ---------------------------------------------------------------

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        """Run one public operation under the product's retry policy; translate what it cannot fix."""
        try:
            return call_with_retry(
                fn,
                dependency="S3",
                what=what,
                target=self.target,
                stop=self.stop,
                give_up_after=self.give_up_after,
                retryable=_retryable,
            )
        except (NoCredentialsError, PartialCredentialsError):
            raise LakeError(
                f"no AWS credentials for S3 bucket {self.bucket} (region {self.region}): set "
                "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or configure the AWS credential chain"
            ) from None
        except Exception as exc:
            if not _retryable(exc):
                raise
            # Only when stopping (or past give_up_after): the operation is not done, the caller tries later.
            raise RetryableError(f"S3 {what} at {self.target} not done: {brief(exc)}") from exc

    def _refuse(self, exc: ClientError, op: str, key: str, permission: str) -> None:
        """Raise the one-line LakeError for what no retry can fix (access denied, no such bucket)."""
        if _status(exc) == 403 or _code(exc) in ("AccessDenied", "Forbidden", "403"):
            raise LakeError(
                f"S3 {op} on s3://{self.bucket}/{key} refused ({_code(exc) or 'HTTP 403'}, region {self.region}): "
                f"grant {permission.format(bucket=self.bucket)} (see docs/s3.md)"
            ) from None
        if _code(exc) == "NoSuchBucket":
            raise self._no_bucket() from None

    def _no_bucket(self) -> LakeError:
        where = f" at {redact_url(self.endpoint)}" if self.endpoint else ""
        return LakeError(
            f"S3 bucket {self.bucket} does not exist (region {self.region}{where}): create it or fix S3_BUCKET_NAME"
        )

    def _head(self, key: str) -> dict | None:
        """The object's HEAD, None when absent (one request, no retry: the caller's operation retries)."""
        try:
            return self._client.head_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if _missing(exc):
                return None
            self._refuse(exc, "head", key, GET_PERMISSION)
            raise

    # -- writes --------------------------------------------------------------------------

    def put_bytes(self, key: str, data: bytes, *, overwrite: bool = False) -> bool:
        validate_key(key)
        sha = hashlib.sha256(data).hexdigest()
        return self._call(f"put {key}", lambda: self._put_once(key, data, sha, overwrite))

    def _put_once(self, key: str, data: bytes, sha: str, overwrite: bool) -> bool:
        """One attempt at a put; safe to repeat (a lost answer is found again by the 412 or the compare)."""
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
                log.info("S3 endpoint %s has no conditional writes: comparing before each put", self.target)
                self.conditional_writes = False
                return self._put_once(key, data, sha, overwrite)
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
        try:
            if len(data) > self.multipart_threshold:
                client = self._cond_client if conditional else self._client
                extra = {"Metadata": {SHA_META: sha}, "ChecksumAlgorithm": "CRC32"}
                client.upload_fileobj(io.BytesIO(data), self.bucket, key, ExtraArgs=extra, Config=self._transfer)
                return
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
            self._client.put_object(**args)
        except ClientError as exc:
            self._refuse(exc, "put", key, PUT_PERMISSION)
            raise

    def _same_content(self, key: str, data: bytes, sha: str) -> bool | None:
        """True/False when `key` exists with the same/different bytes; None when absent."""
        head = self._head(key)
        if head is None:
            return None
        stored = head.get("Metadata", {}).get(SHA_META)
        if stored:
            return stored == sha
        etag = head.get("ETag", "").strip('"')
        if etag and "-" not in etag:
            return etag == hashlib.md5(data, usedforsecurity=False).hexdigest()  # noqa: S324 - S3's ETag is an MD5, not a secret
        return self._get_once(key) == data  # written by another tool, multipart: compare the bytes

    def _conflict(self, key: str, data: bytes) -> ObjectConflict:
        return ObjectConflict(
            f"lake object s3://{self.bucket}/{key} already exists with different content "
            f"(new sha256 {hashlib.sha256(data).hexdigest()[:16]}...); not overwritten"
        )

    # -- reads ---------------------------------------------------------------------------

    def get_bytes(self, key: str) -> bytes:
        validate_key(key)
        return self._call(f"get {key}", lambda: self._get_once(key))

    def _get_once(self, key: str) -> bytes:
        try:
            resp = self._client.get_object(Bucket=self.bucket, Key=key, ChecksumMode="ENABLED")
            return resp["Body"].read()
        except ClientError as exc:
            if _missing(exc):
                raise FileNotFoundError(f"s3://{self.bucket}/{key}") from None
            self._refuse(exc, "get", key, GET_PERMISSION)
            raise

    def exists(self, key: str) -> bool:
        validate_key(key)
        return self._call(f"head {key}", lambda: self._head(key)) is not None

    def list_keys(self, prefix: str) -> Iterator[str]:
        """Every key under `prefix`, one page (up to 1,000 keys) per request, each page retried."""
        token: str | None = None
        page = 0
        while True:
            args = {"Bucket": self.bucket, "Prefix": prefix}
            if token:
                args["ContinuationToken"] = token
            page += 1
            resp = self._call(f"list {prefix or '/'} (page {page})", lambda a=args: self._list_once(a))
            for item in resp.get("Contents", []):
                yield item["Key"]
            if not resp.get("IsTruncated"):
                return
            token = resp["NextContinuationToken"]

    def _list_once(self, args: dict) -> dict:
        try:
            return self._client.list_objects_v2(**args)
        except ClientError as exc:
            self._refuse(exc, "list", args["Prefix"], LIST_PERMISSION)
            raise

    def delete(self, key: str) -> None:
        validate_key(key)

        def once() -> None:
            try:
                self._client.delete_object(Bucket=self.bucket, Key=key)
            except ClientError as exc:
                self._refuse(exc, "delete", key, DELETE_PERMISSION)
                raise

        self._call(f"delete {key}", once)

    # -- identity ------------------------------------------------------------------------

    def spark_uri(self, key: str) -> str:
        key = key.strip("/")
        return f"s3a://{self.bucket}/{key}" if key else f"s3a://{self.bucket}/"

    def describe(self) -> str:
        where = f"endpoint {redact_url(self.endpoint)}" if self.endpoint else "AWS"
        return f"S3 lake s3://{self.bucket} (region {self.region}, {where})"

    def check_writable(self) -> None:
        """Fail fast, in one line naming bucket, region and permission, when the lake is unusable.

        A transient fault (the server not up yet) is waited out like any other; only what waiting cannot
        fix fails. Needs only the permissions the daemon needs (ListBucket, PutObject, GetObject): the
        probe object is overwritten on every start rather than deleted.
        """
        self._call("head-bucket", self._head_bucket_once)
        stamp = f"ok {time.time_ns()}\n".encode()  # new bytes every time: the put is really made (PutObject)
        self.put_bytes(HEALTH_KEY, stamp, overwrite=True)
        self.get_bytes(HEALTH_KEY)

    def _head_bucket_once(self) -> None:
        try:
            self._client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            if _retryable(exc):
                raise
            status = _status(exc)
            if status == 404 or _code(exc) in ("NoSuchBucket", "404"):
                raise self._no_bucket() from None
            self._refuse(exc, "head-bucket", "", LIST_PERMISSION)
            if status == 301:
                actual = exc.response.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("x-amz-bucket-region")
                raise LakeError(
                    f"S3 bucket {self.bucket} is in region {actual or 'another region'}, not AWS_REGION={self.region}"
                ) from None
            raise LakeError(f"S3 bucket {self.bucket} (region {self.region}) cannot be used: {brief(exc)}") from None


def _add_if_none_match(params: dict, **_: object) -> None:
    params["IfNoneMatch"] = "*"
