"""Object-storage helpers shared by every cliplung component (stores, runs, checkpoints, reports).

A *location* is either a local path or an ``s3://bucket/prefix`` URL. S3 covers AWS and any
S3-compatible service (MinIO, Ceph, moto): the endpoint comes from the ``endpoint`` argument, else
the ``AWS_ENDPOINT_URL`` environment variable, else AWS itself.

Credentials are never arguments, never logged and never written anywhere: they come only from the
process environment (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``) or,
when those are unset, from the standard AWS credential chain (e.g. a Kubernetes service account).

Atomic commits: object stores have no rename, so a directory-shaped output (a nodule store, a
checkpoint) is built under a temporary sibling prefix and then committed with :func:`commit`:

* local: the finished directory, completion marker included, is ``os.rename``-d into place (one
  atomic step on a POSIX filesystem);
* S3: objects are copied server-side to the final prefix, *then* the marker is written, then the
  temporary prefix is deleted. A reader treats a prefix without its marker as incomplete, so a crash
  at any point leaves either the old complete output, or an incomplete one that is refused.
"""

from __future__ import annotations

import os
import shutil
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import fsspec
    import pyarrow.fs

__all__ = [
    "StorageError",
    "StorageLocation",
    "check_endpoint",
    "commit",
    "exists",
    "fsspec_filesystem",
    "is_s3",
    "join",
    "parse_location",
    "pyarrow_filesystem",
    "read_text",
    "rename",
    "resolve_endpoint",
    "rm",
    "s3_storage_options",
    "temporary_sibling",
    "write_text",
]


class StorageError(RuntimeError):
    """A storage location is unreachable, malformed or in an unexpected state."""


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


def temporary_sibling(location: str, tag: str = "tmp") -> str:
    """A fresh sibling of ``location`` (``STORE.tmp-<uuid>``) to build an output in before commit."""
    return f"{str(location).rstrip('/')}.{tag}-{uuid.uuid4().hex[:12]}"


# --------------------------------------------------------------------------- endpoints, filesystems


def resolve_endpoint(endpoint: str | None = None) -> str | None:
    """The S3 endpoint URL to use: the argument, else ``AWS_ENDPOINT_URL``, else None (AWS)."""
    endpoint = endpoint or os.environ.get("AWS_ENDPOINT_URL") or None
    if endpoint is not None and "://" not in endpoint:
        raise StorageError(f"S3 endpoint {endpoint!r}: expected a URL such as http://minio:9000")
    return endpoint


def check_endpoint(endpoint: str | None = None, *, timeout: float = 5.0) -> None:
    """Raise :class:`StorageError` naming the URL when the S3 endpoint does not answer HTTP.

    Any HTTP answer, including 403 for an anonymous request, proves the endpoint is up; only a
    connection failure or a timeout is an error. Without an explicit endpoint (AWS) nothing is
    checked: AWS reachability is the network's business, and botocore reports it clearly.
    """
    url = resolve_endpoint(endpoint)
    if url is None:
        return
    try:
        with urllib.request.urlopen(url, timeout=timeout):
            pass
    except urllib.error.HTTPError:
        return
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise StorageError(
            f"S3 endpoint {url} is not reachable ({reason}); check --storage-endpoint / AWS_ENDPOINT_URL "
            "and that the object store is running"
        ) from None


def _env_credentials() -> dict[str, str]:
    # Read at call time (not import time) so a credential rotated in the environment is picked
    # up; only ever passed to the client, never stored.
    creds = {}
    for key, env in (
        ("key", "AWS_ACCESS_KEY_ID"),
        ("secret", "AWS_SECRET_ACCESS_KEY"),
        ("token", "AWS_SESSION_TOKEN"),
    ):
        if os.environ.get(env):
            creds[key] = os.environ[env]
    return creds


def s3_storage_options(endpoint: str | None = None) -> dict:
    """fsspec/s3fs keyword arguments for an S3 location (endpoint + environment credentials).

    The result holds secrets: pass it straight to a client, never print or persist it.
    """
    options: dict = {**_env_credentials()}
    url = resolve_endpoint(endpoint)
    if url is not None:
        options["endpoint_url"] = url
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        options["client_kwargs"] = {"region_name": region}
    return options


def fsspec_filesystem(location: str, endpoint: str | None = None) -> fsspec.AbstractFileSystem:
    """An fsspec filesystem for ``location`` (``s3fs`` for S3, the local filesystem otherwise).

    S3 filesystems keep no listing cache: commits list a prefix right after writing to it, and a
    stale cached listing would hide the new objects. (fsspec still reuses one client per endpoint
    and credentials, which keeps small operations cheap.)
    """
    import fsspec

    if not is_s3(location):
        return fsspec.filesystem("file")
    import s3fs

    return s3fs.S3FileSystem(use_listings_cache=False, **s3_storage_options(endpoint))


def pyarrow_filesystem(location: str, endpoint: str | None = None) -> tuple[pyarrow.fs.FileSystem, str]:
    """A ``pyarrow.fs`` filesystem and the path inside it (``bucket/key`` for S3), as Ray Train's
    ``RunConfig(storage_filesystem=...)`` and Ray Data expect."""
    import pyarrow.fs as pafs

    loc = parse_location(location)
    if not loc.is_s3:
        return pafs.LocalFileSystem(), loc.path
    kwargs: dict = {}
    creds = _env_credentials()
    if "key" in creds and "secret" in creds:
        kwargs.update(access_key=creds["key"], secret_key=creds["secret"], session_token=creds.get("token"))
    url = resolve_endpoint(endpoint)
    if url is not None:
        scheme, host = url.split("://", 1)
        kwargs.update(endpoint_override=host.rstrip("/"), scheme=scheme)
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
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


def rm(
    location: str, endpoint: str | None = None, *, recursive: bool = True, missing_ok: bool = True
) -> None:
    """Delete a file or (recursively) a directory / prefix."""
    loc = parse_location(location)
    if not exists(location, endpoint):
        if missing_ok:
            return
        raise StorageError(f"{location}: cannot delete, it does not exist")
    if not loc.is_s3:
        if os.path.isdir(loc.path) and not os.path.islink(loc.path):
            if not recursive:
                raise StorageError(f"{location}: is a directory (pass recursive=True)")
            shutil.rmtree(loc.path)
        else:
            os.remove(loc.path)
        return
    fs = fsspec_filesystem(location, endpoint)
    fs.rm(loc.path, recursive=recursive)


def write_text(location: str, text: str, endpoint: str | None = None) -> None:
    """Write a small text file (creating parent directories locally)."""
    loc = parse_location(location)
    if not loc.is_s3:
        os.makedirs(os.path.dirname(loc.path) or ".", exist_ok=True)
        with open(loc.path, "w", encoding="utf-8") as f:
            f.write(text)
        return
    fsspec_filesystem(location, endpoint).pipe_file(loc.path, text.encode("utf-8"))


def read_text(location: str, endpoint: str | None = None) -> str:
    """Read a small text file."""
    loc = parse_location(location)
    if not loc.is_s3:
        with open(loc.path, encoding="utf-8") as f:
            return f.read()
    return fsspec_filesystem(location, endpoint).cat_file(loc.path).decode("utf-8")


def _list_files(fs, root: str) -> list[str]:
    """Paths of all files below ``root``, relative to it."""
    root = root.rstrip("/")
    return sorted(p[len(root) + 1 :] for p in fs.find(root) if p.startswith(root + "/"))


def rename(src: str, dst: str, endpoint: str | None = None) -> None:
    """Move a directory / prefix ``src`` to ``dst`` (which must not exist).

    Local: one ``os.rename`` (atomic). S3: server-side copy of every object, then delete of the
    source, which is *not* atomic: use :func:`commit` with a marker when readers may look.
    """
    s, d = parse_location(src), parse_location(dst)
    if s.scheme != d.scheme:
        raise StorageError(f"cannot rename {src} to {dst}: different storage kinds")
    if exists(dst, endpoint):
        raise StorageError(f"cannot rename {src} to {dst}: destination exists")
    if not s.is_s3:
        os.makedirs(os.path.dirname(d.path) or ".", exist_ok=True)
        os.rename(s.path, d.path)
        return
    fs = fsspec_filesystem(src, endpoint)
    for rel in _list_files(fs, s.path):
        fs.copy(f"{s.path}/{rel}", f"{d.path}/{rel}")
    fs.rm(s.path, recursive=True)


def commit(
    tmp: str, final: str, *, marker: str, endpoint: str | None = None, overwrite: bool = False
) -> None:
    """Move a finished build at ``tmp`` to ``final`` so that ``final/marker`` appears last.

    ``tmp`` must already hold everything, ``marker`` included. An existing ``final`` is replaced
    only with ``overwrite=True``; its marker is deleted first, so a crash in the middle of an S3
    commit leaves a prefix that readers refuse rather than a mixture that looks complete.
    """
    t, f = parse_location(tmp), parse_location(final)
    if t.scheme != f.scheme:
        raise StorageError(f"cannot commit {tmp} to {final}: different storage kinds")
    if not exists(join(tmp, marker), endpoint):
        raise StorageError(f"cannot commit {tmp}: it has no completion marker {marker!r}")
    if exists(final, endpoint) and not overwrite:
        raise StorageError(f"{final} already exists (pass overwrite=True to replace it)")

    if not t.is_s3:
        old = None
        if os.path.exists(f.path):
            # Move the old output aside first: a directory cannot be os.replace-d by another, and
            # the window where `final` is missing is two renames wide, never half-written.
            old = temporary_sibling(f.path, "old")
            os.rename(f.path, old)
        os.makedirs(os.path.dirname(f.path) or ".", exist_ok=True)
        os.rename(t.path, f.path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return

    fs = fsspec_filesystem(tmp, endpoint)
    if fs.exists(f.path):
        if fs.exists(f"{f.path}/{marker}"):
            fs.rm(f"{f.path}/{marker}")
        fs.rm(f.path, recursive=True)
    for rel in _list_files(fs, t.path):
        if rel != marker:
            fs.copy(f"{t.path}/{rel}", f"{f.path}/{rel}")
    fs.copy(f"{t.path}/{marker}", f"{f.path}/{marker}")
    fs.rm(t.path, recursive=True)
