"""Object-storage helpers shared by every cliplung component (stores, runs, checkpoints, reports).

A *location* is either a local path or an ``s3://bucket/prefix`` URL. S3 covers AWS and any
S3-compatible service (SeaweedFS, MinIO, Ceph): the endpoint comes from the ``endpoint`` argument,
else the ``AWS_ENDPOINT_URL`` environment variable, else AWS itself.

Credentials are never arguments, never logged and never written anywhere: every client here
(botocore, s3fs, ``pyarrow.fs.S3FileSystem``) is built *without* keys and finds them through the
AWS SDK's own default chain (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` /
``AWS_SESSION_TOKEN``, a profile, a web-identity token, an instance or pod role). That matters
beyond logs: Ray Tune pickles the run's filesystem object into ``tuner.pkl`` in run storage, and a
filesystem built with explicit keys pickles them.

Transient object-store failures (connection refused or reset, timeouts, 5xx, throttling) are told
apart from real ones by :func:`is_transient`; :func:`retry` retries them with bounded exponential
backoff and then raises :class:`StorageError` naming what it was doing.

Writes that others may read while they happen: :func:`write_bytes` replaces a local file with one
``os.replace`` (a reader sees the old or the new content, never a mixture; an S3 PUT is atomic by
itself), and :func:`replace_if` replaces a small object only if it still holds what the caller read
(S3 conditional writes ``If-Match`` / ``If-None-Match``; a lock on the folder locally).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import random
import shutil
import socket
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    import fsspec
    import pyarrow.fs

__all__ = [
    "StorageConflict",
    "StorageError",
    "StorageLocation",
    "aretry",
    "check_endpoint",
    "describe_error",
    "exists",
    "fsspec_filesystem",
    "has_objects",
    "is_s3",
    "is_transient",
    "join",
    "list_entries",
    "list_objects",
    "parse_location",
    "pyarrow_filesystem",
    "read_bytes",
    "read_tagged",
    "read_text",
    "replace_if",
    "resolve_endpoint",
    "retry",
    "rm",
    "s3_client",
    "s3_storage_options",
    "sha256_of",
    "write_bytes",
    "write_text",
]

logger = logging.getLogger(__name__)
T = TypeVar("T")

RETRY_ATTEMPTS = 8
"""Attempts of one operation on transient errors (the first try included)."""
RETRY_FIRST_DELAY_S = 0.5
RETRY_MAX_DELAY_S = 8.0
"""Backoff doubles from the first delay up to this cap: 0.5 + 1 + 2 + 4 + 8 + 8 + 8 = 31.5 s of
waiting at most, plus the failed attempts themselves; enough for an object store's restart."""

# S3 error codes that say "try again later", not "this request is wrong".
TRANSIENT_CODES = frozenset(
    {
        "InternalError",
        "ServiceUnavailable",
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestTimeout",
        "RequestLimitExceeded",
        "BandwidthLimitExceeded",
        "OperationAborted",
    }
)
# S3 error codes that mean the credentials themselves are wrong (as opposed to a policy that
# denies one operation, which valid credentials scoped to one bucket get for ListBuckets).
CREDENTIAL_CODES = frozenset(
    {"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken", "TokenRefreshRequired"}
)


class StorageError(RuntimeError):
    """A storage location is unreachable, malformed or in an unexpected state."""


class StorageConflict(StorageError):
    """A conditional write found the object changed since it was read (another writer won)."""


@dataclass(frozen=True)
class StorageLocation:
    """A parsed location: ``scheme`` is ``"s3"`` or ``"file"``; for S3 ``path`` is ``bucket/key``."""

    scheme: str
    path: str

    @property
    def is_s3(self) -> bool:
        return self.scheme == "s3"

    @property
    def bucket(self) -> str:
        return self.path.split("/", 1)[0] if self.is_s3 else ""

    @property
    def key(self) -> str:
        return self.path.split("/", 1)[1] if self.is_s3 and "/" in self.path else ""

    @property
    def url(self) -> str:
        return f"s3://{self.path}" if self.is_s3 else self.path


def is_s3(location: str) -> bool:
    """True for ``s3://`` URLs."""
    return str(location).startswith("s3://")


def parse_location(location: str) -> StorageLocation:
    """Split ``s3://bucket/prefix`` from a local path; local paths become absolute."""
    location = str(location)
    if is_s3(location):
        path = location[len("s3://") :].strip("/")
        if not path or path.startswith("/"):
            raise StorageError(f"{location!r}: expected s3://bucket/prefix")
        return StorageLocation("s3", path)
    if "://" in location and not location.startswith("file://"):
        scheme = location.split("://", 1)[0]
        raise StorageError(f"{location!r}: unsupported scheme {scheme!r} (use a local path or s3://)")
    if location.startswith("file://"):
        location = location[len("file://") :]
    return StorageLocation("file", os.path.abspath(os.path.expanduser(location)))


def join(base: str, *parts: str) -> str:
    """Join path parts with ``/`` for S3 URLs and ``os.path.join`` for local paths."""
    if is_s3(base):
        pieces = [str(base).rstrip("/")] + [str(p).strip("/") for p in parts if p]
        return "/".join(pieces)
    return os.path.join(base, *parts)


# --------------------------------------------------------------------------- transient errors, retries


def _error_code(exc: BaseException) -> tuple[str, int]:
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return "", 0
    code = str(response.get("Error", {}).get("Code", ""))
    status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return code, status


def is_transient(exc: BaseException) -> bool:
    """True when ``exc`` (or what caused it) is a failure worth retrying: the object store could
    not be reached, dropped the connection, timed out, answered 5xx or asked to slow down."""
    try:
        import botocore.exceptions as boto_errors

        boto_transient: tuple[type[BaseException], ...] = (
            boto_errors.ConnectionError,  # EndpointConnectionError, ConnectTimeout, ReadTimeout, ...
            boto_errors.HTTPClientError,
            boto_errors.IncompleteReadError,
            boto_errors.ResponseStreamingError,
        )
    except ImportError:  # pragma: no cover - botocore comes with s3fs
        boto_transient = ()
    try:
        import aiohttp

        aio_transient: tuple[type[BaseException], ...] = (
            aiohttp.ClientConnectionError,
            aiohttp.ClientPayloadError,
        )
    except ImportError:  # pragma: no cover
        aio_transient = ()
    transient = (ConnectionError, TimeoutError, socket.timeout, *boto_transient, *aio_transient)
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, transient):
            return True
        code, status = _error_code(exc)
        if code in TRANSIENT_CODES or status >= 500:
            return True
        if isinstance(exc, OSError) and exc.errno in (
            errno.ECONNREFUSED,
            errno.ECONNRESET,
            errno.ETIMEDOUT,
            errno.EPIPE,
            errno.EHOSTUNREACH,
            errno.ENETUNREACH,
            errno.EREMOTEIO,  # s3fs's translation of InternalError
        ):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def describe_error(exc: BaseException) -> str:
    """``Type: message``, one line, short enough for a log line (never carries credentials:
    botocore messages name endpoints and keys of objects, not secrets)."""
    text = " ".join(str(exc).split()) or repr(exc)
    return f"{type(exc).__name__}: {text[:300]}"


def _delays(attempts: int):
    delay = RETRY_FIRST_DELAY_S
    for _ in range(attempts - 1):
        # A little jitter so many readers that failed together do not retry together.
        yield delay * random.uniform(0.8, 1.2)
        delay = min(delay * 2, RETRY_MAX_DELAY_S)


def retry(fn: Callable[[], T], *, what: str, attempts: int | None = None) -> T:
    """``fn()``, retried on :func:`is_transient` errors with bounded exponential backoff
    (``attempts`` tries, default :data:`RETRY_ATTEMPTS`).

    Each retry is logged (``what``, the error, the delay). After the last attempt a
    :class:`StorageError` says ``what`` failed and how long it kept trying; errors that are not
    transient propagate at once, unchanged.
    """
    attempts = RETRY_ATTEMPTS if attempts is None else attempts
    started = time.monotonic()
    delays = _delays(attempts)
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as exc:
            if not is_transient(exc):
                raise
            delay = next(delays, None)
            if delay is None:
                raise StorageError(
                    f"{what}: {describe_error(exc)} (gave up after {attempt} attempts over "
                    f"{time.monotonic() - started:.0f} s)"
                ) from exc
            logger.warning(
                "%s: %s; retry %d/%d in %.1f s", what, describe_error(exc), attempt, attempts - 1, delay
            )
            time.sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


async def aretry(fn, *, what: str, attempts: int | None = None):
    """:func:`retry` for a coroutine function (``await fn()``)."""
    import asyncio

    attempts = RETRY_ATTEMPTS if attempts is None else attempts
    started = time.monotonic()
    delays = _delays(attempts)
    for attempt in range(1, attempts + 1):
        try:
            return await fn()
        except Exception as exc:
            if not is_transient(exc):
                raise
            delay = next(delays, None)
            if delay is None:
                raise StorageError(
                    f"{what}: {describe_error(exc)} (gave up after {attempt} attempts over "
                    f"{time.monotonic() - started:.0f} s)"
                ) from exc
            logger.warning(
                "%s: %s; retry %d/%d in %.1f s", what, describe_error(exc), attempt, attempts - 1, delay
            )
            await asyncio.sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


# --------------------------------------------------------------------------- endpoints, clients


def resolve_endpoint(endpoint: str | None = None) -> str | None:
    """The S3 endpoint URL to use: the argument, else ``AWS_ENDPOINT_URL``, else None (AWS)."""
    endpoint = endpoint or os.environ.get("AWS_ENDPOINT_URL") or None
    if endpoint is not None and "://" not in endpoint:
        raise StorageError(f"S3 endpoint {endpoint!r}: expected a URL such as http://minio:9000")
    return endpoint


def _region() -> str | None:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None


_clients: dict[tuple, object] = {}
_clients_lock = threading.Lock()


def s3_client(endpoint: str | None = None):
    """A botocore S3 client for ``endpoint`` with the SDK's default credential chain.

    Clients are reused per endpoint, region and credential environment (a key rotated in the
    environment gets a new client); they live in this process's memory only.
    """
    import botocore.config
    import botocore.session

    url = resolve_endpoint(endpoint)
    identity = tuple(
        os.environ.get(name)
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")
    )
    key = (url, _region(), identity, os.getpid())
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            config = botocore.config.Config(
                retries={"mode": "standard", "max_attempts": 3}, connect_timeout=5, read_timeout=60
            )
            client = botocore.session.get_session().create_client(
                "s3", endpoint_url=url, region_name=_region() or "us-east-1", config=config
            )
            _clients[key] = client
    return client


def check_endpoint(endpoint: str | None = None, *, timeout: float = 5.0) -> None:
    """Raise :class:`StorageError` naming the URL when the S3 endpoint does not answer, or refuses
    the credentials the default chain finds.

    Reachability: any HTTP answer, including 403 for an anonymous request, proves the endpoint is
    up; a connection failure or a timeout is an error. Credentials: one signed ``ListBuckets``;
    an unknown key, a wrong secret or an expired token is an error, while ``AccessDenied`` is not
    (keys scoped to one bucket may not list buckets). Without an explicit endpoint (AWS) nothing
    is checked: AWS reachability is the network's business, and botocore reports it clearly.
    """
    url = resolve_endpoint(endpoint)
    if url is None:
        return
    try:
        with urllib.request.urlopen(url, timeout=timeout):
            pass
    except urllib.error.HTTPError:
        pass
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise StorageError(
            f"S3 endpoint {url} is not reachable ({reason}); check --storage-endpoint / AWS_ENDPOINT_URL "
            "and that the object store is running"
        ) from None
    import botocore.exceptions

    try:
        s3_client(url).list_buckets()
    except botocore.exceptions.NoCredentialsError:
        return  # anonymous access: whether it may read is the bucket policy's business
    except botocore.exceptions.ClientError as exc:
        code, _ = _error_code(exc)
        if code in CREDENTIAL_CODES:
            message = exc.response.get("Error", {}).get("Message", "")
            raise StorageError(
                f"S3 endpoint {url} refused the credentials ({code}: {message}); check "
                "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or the AWS profile or role) for this endpoint"
            ) from None
    except Exception as exc:
        if not is_transient(exc):
            raise


def s3_storage_options(endpoint: str | None = None) -> dict:
    """fsspec/s3fs keyword arguments for an S3 location: endpoint, region and client settings.

    No credentials: s3fs (botocore) finds them through the default chain, and an s3fs
    filesystem pickles its keyword arguments.
    """
    options: dict = {
        "config_kwargs": {
            "retries": {"mode": "standard", "max_attempts": 3},
            "connect_timeout": 5,
            "read_timeout": 60,
        }
    }
    url = resolve_endpoint(endpoint)
    if url is not None:
        options["endpoint_url"] = url
    region = _region()
    if region:
        options["client_kwargs"] = {"region_name": region}
    return options


def fsspec_filesystem(location: str, endpoint: str | None = None) -> fsspec.AbstractFileSystem:
    """An fsspec filesystem for ``location`` (``s3fs`` for S3, the local filesystem otherwise).

    S3 filesystems keep no listing cache: callers list a prefix right after writing to it, and a
    stale cached listing would hide the new objects. (fsspec still reuses one client per endpoint,
    which keeps small operations cheap.)
    """
    import fsspec

    if not is_s3(location):
        return fsspec.filesystem("file")
    import s3fs

    return s3fs.S3FileSystem(use_listings_cache=False, **s3_storage_options(endpoint))


def pyarrow_filesystem(location: str, endpoint: str | None = None) -> tuple[pyarrow.fs.FileSystem, str]:
    """A ``pyarrow.fs`` filesystem and the path inside it (``bucket/key`` for S3), as Ray Train's
    ``RunConfig(storage_filesystem=...)`` and Ray Data expect. Built without keys (see the module
    docstring): Tune pickles it into run storage."""
    import pyarrow.fs as pafs

    loc = parse_location(location)
    if not loc.is_s3:
        return pafs.LocalFileSystem(), loc.path
    kwargs: dict = {}
    url = resolve_endpoint(endpoint)
    if url is not None:
        scheme, host = url.split("://", 1)
        kwargs.update(endpoint_override=host.rstrip("/"), scheme=scheme)
    region = _region()
    if region:
        kwargs["region"] = region
    return pafs.S3FileSystem(**kwargs), loc.path


# --------------------------------------------------------------------------- small file operations


def exists(location: str, endpoint: str | None = None) -> bool:
    """True when a file or a non-empty prefix exists at ``location``."""
    loc = parse_location(location)
    if not loc.is_s3:
        return os.path.exists(loc.path)
    return fsspec_filesystem(location, endpoint).exists(loc.path)


def has_objects(location: str, endpoint: str | None = None) -> bool:
    """True when at least one object (file) lies at or below ``location``.

    Unlike :func:`exists`, a prefix some S3 servers keep listing as a folder after its last
    object was deleted (SeaweedFS does) counts as empty, and so does a local tree of empty folders.
    """
    loc = parse_location(location)
    if not loc.is_s3:
        if os.path.isfile(loc.path):
            return True
        return any(files for _, _, files in os.walk(loc.path))
    client = s3_client(endpoint)
    key = loc.key.rstrip("/")
    if key:
        exact = client.list_objects_v2(Bucket=loc.bucket, Prefix=key, MaxKeys=1).get("Contents", [])
        if exact and exact[0]["Key"] == key:
            return True
    below = client.list_objects_v2(Bucket=loc.bucket, Prefix=f"{key}/" if key else "", MaxKeys=1)
    return bool(below.get("Contents"))


def list_entries(location: str, endpoint: str | None = None) -> list[tuple[str, bool]]:
    """The immediate children of a folder / prefix as ``(name, is_folder)``, sorted; ``[]`` when
    there is nothing there. S3 folders may be leftovers without objects (see :func:`has_objects`)."""
    loc = parse_location(location)
    if not loc.is_s3:
        if not os.path.isdir(loc.path):
            return []
        with os.scandir(loc.path) as it:
            return sorted((e.name, e.is_dir(follow_symlinks=False)) for e in it)
    client = s3_client(endpoint)
    prefix = f"{loc.key.rstrip('/')}/" if loc.key else ""
    out: list[tuple[str, bool]] = []
    for page in client.get_paginator("list_objects_v2").paginate(
        Bucket=loc.bucket, Prefix=prefix, Delimiter="/"
    ):
        out += [(p["Prefix"][len(prefix) :].rstrip("/"), True) for p in page.get("CommonPrefixes", [])]
        out += [(o["Key"][len(prefix) :], False) for o in page.get("Contents", []) if o["Key"] != prefix]
    return sorted(out)


def list_objects(location: str, endpoint: str | None = None) -> dict[str, int]:
    """Every object (file) below ``location``, as relative path (``/``-separated) -> size in bytes."""
    loc = parse_location(location)
    if not loc.is_s3:
        out = {}
        for folder, _, files in os.walk(loc.path):
            for name in files:
                full = os.path.join(folder, name)
                out[os.path.relpath(full, loc.path).replace(os.sep, "/")] = os.path.getsize(full)
        return out
    client = s3_client(endpoint)
    prefix = f"{loc.key.rstrip('/')}/" if loc.key else ""
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=loc.bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            rel = obj["Key"][len(prefix) :]
            if rel and not rel.endswith("/"):
                out[rel] = int(obj["Size"])
    return out


def rm(
    location: str, endpoint: str | None = None, *, recursive: bool = True, missing_ok: bool = True
) -> None:
    """Delete a file or (recursively) a directory / prefix."""
    loc = parse_location(location)
    if not loc.is_s3:
        if not os.path.lexists(loc.path):
            if missing_ok:
                return
            raise StorageError(f"{location}: cannot delete, it does not exist")
        if os.path.isdir(loc.path) and not os.path.islink(loc.path):
            if not recursive:
                raise StorageError(f"{location}: is a directory (pass recursive=True)")
            shutil.rmtree(loc.path)
        else:
            os.remove(loc.path)
        return
    if not loc.key:
        raise StorageError(f"{location}: refusing to delete a whole bucket")
    client = s3_client(endpoint)
    exact = client.list_objects_v2(Bucket=loc.bucket, Prefix=loc.key, MaxKeys=1).get("Contents", [])
    keys = [o["Key"] for o in exact if o["Key"] == loc.key]
    if recursive:
        keys += [f"{loc.key.rstrip('/')}/{rel}" for rel in list_objects(location, endpoint)]
    if not keys:
        if missing_ok:
            return
        raise StorageError(f"{location}: cannot delete, it does not exist")
    for start in range(0, len(keys), 1000):
        batch = [{"Key": k} for k in keys[start : start + 1000]]
        answer = client.delete_objects(Bucket=loc.bucket, Delete={"Objects": batch, "Quiet": True})
        if answer.get("Errors"):
            first = answer["Errors"][0]
            raise StorageError(f"{location}: cannot delete {first.get('Key')}: {first.get('Message')}")


def read_bytes(location: str, endpoint: str | None = None) -> bytes:
    """The content of a file / object; :class:`FileNotFoundError` when there is none."""
    data, _ = read_tagged(location, endpoint)
    if data is None:
        raise FileNotFoundError(location)
    return data


def read_tagged(location: str, endpoint: str | None = None) -> tuple[bytes | None, str | None]:
    """``(content, tag)`` of a small file / object, ``(None, None)`` when it does not exist. The tag
    identifies this content for :func:`replace_if` (the ETag on S3, a digest locally)."""
    loc = parse_location(location)
    if not loc.is_s3:
        try:
            with open(loc.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None, None
        return data, hashlib.sha256(data).hexdigest()
    import botocore.exceptions

    try:
        answer = s3_client(endpoint).get_object(Bucket=loc.bucket, Key=loc.key)
    except botocore.exceptions.ClientError as exc:
        if _error_code(exc)[0] in ("NoSuchKey", "404"):
            return None, None
        raise
    return answer["Body"].read(), answer["ETag"]


def write_bytes(location: str, data: bytes, endpoint: str | None = None) -> None:
    """Write a file / object whole. Locally via a temporary file and ``os.replace`` (fsync'd), so
    a crash or a concurrent reader never sees a half-written file."""
    loc = parse_location(location)
    if loc.is_s3:
        s3_client(endpoint).put_object(Bucket=loc.bucket, Key=loc.key, Body=data)
        return
    folder = os.path.dirname(loc.path) or "."
    os.makedirs(folder, exist_ok=True)
    tmp = f"{loc.path}.tmp-{uuid.uuid4().hex[:12]}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, loc.path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
    _fsync_dir(folder)


def _fsync_dir(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_if(location: str, data: bytes, expected_tag: str | None, endpoint: str | None = None) -> None:
    """Write ``data`` to ``location`` only if it still holds the content ``expected_tag`` names
    (:func:`read_tagged`), or, with ``expected_tag=None``, only if it does not exist yet.

    Raises :class:`StorageConflict` when another writer changed it in between. S3: a conditional
    PUT (``If-Match`` / ``If-None-Match: *``; a server that does not implement them gets a plain
    PUT). Locally: an exclusive lock on the containing folder around compare-and-replace.
    """
    loc = parse_location(location)
    if loc.is_s3:
        import botocore.exceptions

        condition = {"IfMatch": expected_tag} if expected_tag else {"IfNoneMatch": "*"}
        client = s3_client(endpoint)
        try:
            client.put_object(Bucket=loc.bucket, Key=loc.key, Body=data, **condition)
        except botocore.exceptions.ClientError as exc:
            code, status = _error_code(exc)
            if code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412):
                raise StorageConflict(f"{location} changed while it was being replaced ({code})") from None
            if code == "NotImplemented" or status == 501:
                client.put_object(Bucket=loc.bucket, Key=loc.key, Body=data)
                return
            raise
        return
    import fcntl

    folder = os.path.dirname(loc.path) or "."
    os.makedirs(folder, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        _, tag = read_tagged(location)
        if tag != expected_tag:
            raise StorageConflict(f"{location} changed while it was being replaced")
        write_bytes(location, data)
    finally:
        os.close(fd)  # releases the lock


def sha256_of(location: str, endpoint: str | None = None, block: int = 8 << 20) -> tuple[int, str]:
    """``(size, sha256 hex)`` of a file / object, streamed; :class:`FileNotFoundError` if absent."""
    digest = hashlib.sha256()
    size = 0
    loc = parse_location(location)
    if not loc.is_s3:
        with open(loc.path, "rb") as f:
            while chunk := f.read(block):
                digest.update(chunk)
                size += len(chunk)
        return size, digest.hexdigest()
    import botocore.exceptions

    try:
        body = s3_client(endpoint).get_object(Bucket=loc.bucket, Key=loc.key)["Body"]
    except botocore.exceptions.ClientError as exc:
        if _error_code(exc)[0] in ("NoSuchKey", "404"):
            raise FileNotFoundError(location) from None
        raise
    for chunk in body.iter_chunks(block):
        digest.update(chunk)
        size += len(chunk)
    return size, digest.hexdigest()


def write_text(location: str, text: str, endpoint: str | None = None) -> None:
    """Write a small text file (creating parent directories locally; atomic, see :func:`write_bytes`)."""
    write_bytes(location, text.encode("utf-8"), endpoint)


def read_text(location: str, endpoint: str | None = None) -> str:
    """Read a small text file."""
    return read_bytes(location, endpoint).decode("utf-8")
