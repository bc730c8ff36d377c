"""Object storage for workspace snapshots and file transfers: an S3 bucket (MinIO) or a local directory."""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
import uuid
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, ContextManager, Iterator

import certifi
import urllib3
from minio import Minio
from minio.commonconfig import CopySource
from minio.error import MinioException, S3Error
from minio.helpers import check_bucket_name

from core.errors import NotFound, Unavailable

log = logging.getLogger(__name__)

CHUNK = 1 << 20
PART_SIZE = 5 << 20  # S3's minimum part; minio holds one part in memory, and 10,000 parts cap an object at 50 GB
TMP_PREFIX = ".tmp"  # temporaries live under one prefix, so leftovers of a crash are easy to find and expire
AUTH_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied"}


class ObjectMissing(NotFound):
    code = "object_missing"


@dataclass(frozen=True)
class StoredObject:
    key: str
    size: int
    sha256: str  # hex


def check_key(key: str) -> str:
    """Returns the key if it is a clean "/"-separated relative name; raises ValueError otherwise."""
    if not isinstance(key, str) or not key or key.startswith("/") or "\\" in key or "\x00" in key:
        raise ValueError(f"bad storage key {key!r}: want a relative name like 'a/b/c'")
    parts = key.split("/")
    if any(p in ("", ".", "..") for p in parts) or parts[0] == TMP_PREFIX:
        raise ValueError(f"bad storage key {key!r}: empty, '.', '..' or {TMP_PREFIX!r} segment")
    return key


class _HashingReader:
    """Passes reads through, counting and hashing them; remembers the source's own failure."""

    def __init__(self, source: BinaryIO) -> None:
        self.source, self.size, self.digest, self.error = source, 0, hashlib.sha256(), None

    def read(self, n: int = -1) -> bytes:
        try:
            data = self.source.read(n)
        except BaseException as e:
            self.error = e
            raise
        self.size += len(data)
        self.digest.update(data)
        return data

    def stored(self, key: str) -> StoredObject:
        return StoredObject(key, self.size, self.digest.hexdigest())


class Storage(ABC):
    @abstractmethod
    def put(self, key: str, source: BinaryIO) -> StoredObject:
        """Stores what `source` yields to its end, atomically: `key` holds all of it or stays as it was."""

    @abstractmethod
    def open(self, key: str) -> ContextManager[BinaryIO]:
        """A readable stream of the object; ObjectMissing if there is none."""

    @abstractmethod
    def exists(self, key: str) -> bool:
        """Whether an object is stored at `key`."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Removes the object; a missing one is fine."""

    @abstractmethod
    def describe(self) -> str:
        """Where the objects live, for logs."""

    def put_file(self, key: str, path: str | Path) -> StoredObject:
        """Stores a local file."""
        with open(path, "rb") as source:
            return self.put(key, source)

    def download(self, key: str, path: str | Path) -> None:
        """Writes the object to a local file, which appears only once complete."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.part")
        try:
            with self.open(key) as source, open(tmp, "wb") as out:
                shutil.copyfileobj(source, out, CHUNK)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


class LocalStorage(Storage):
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        path = (self.root / check_key(key)).resolve()
        if not path.is_relative_to(self.root):  # a symlink inside the root could point out of it
            raise ValueError(f"storage key {key!r} leads out of {self.root}")
        return path

    def put(self, key: str, source: BinaryIO) -> StoredObject:
        path, reader = self._path(key), _HashingReader(source)
        tmp = self.root / TMP_PREFIX / uuid.uuid4().hex  # same file system as the target: os.replace is atomic
        tmp.parent.mkdir(exist_ok=True)
        try:
            with open(tmp, "wb") as out:
                while chunk := reader.read(CHUNK):
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())  # the new content is on disk before the name points at it
            path.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return reader.stored(key)

    def open(self, key: str) -> ContextManager[BinaryIO]:
        try:
            return open(self._path(key), "rb")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectMissing(f"no object {key!r} in {self.describe()}") from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        path = self._path(key)
        if path.is_file():
            path.unlink(missing_ok=True)

    def describe(self) -> str:
        return f"local dir {self.root}"


class S3Storage(Storage):
    def __init__(self, endpoint: str, access_key: str, secret_key: str, bucket: str, secure: bool = False) -> None:
        self.endpoint, self.bucket, self.secure = endpoint, bucket, secure
        # minio's default pool waits 5 minutes per try, 6 tries: a dead store should fail in seconds, a hung one in
        # a minute (the read timeout must still outlast a server-side copy of a large snapshot).
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=3, read=60), maxsize=10, cert_reqs="CERT_REQUIRED",
            ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(),
            retries=urllib3.Retry(total=3, connect=1, read=0, backoff_factor=0.2,
                                  status_forcelist=[500, 502, 503, 504]))
        try:
            check_bucket_name(bucket)
            self.client = Minio(endpoint, access_key=access_key or None, secret_key=secret_key or None,
                                secure=secure, http_client=http)
        except ValueError as e:
            raise Unavailable(f"object store misconfigured ({e}); check MINIO_ENDPOINT (host:port) "
                              "and MINIO_BUCKET") from None
        self._bucket_ready = False
        self._lock = threading.Lock()

    @contextmanager
    def _errors(self, key: str = "", reader: _HashingReader | None = None) -> Iterator[None]:
        """Turns the client's failures into domain errors; the source's own failure passes unchanged."""
        try:
            yield
        except (MinioException, urllib3.exceptions.HTTPError) as e:
            if reader is not None and e is reader.error:
                raise
            if isinstance(e, S3Error) and e.code == "NoSuchKey":
                raise ObjectMissing(f"no object {key!r} in {self.describe()}") from None
            if isinstance(e, S3Error):
                if e.code == "NoSuchBucket":
                    self._bucket_ready = False  # removed behind our back: the next call creates it again
                hint = "check MINIO_ACCESS_KEY and MINIO_SECRET_KEY" if e.code in AUTH_CODES else f"S3 code {e.code}"
                raise Unavailable(f"object store {self.describe()} refused: {e.message}; {hint}") from e
            raise Unavailable(f"object store {self.describe()} is unreachable ({e}); "
                              "check MINIO_ENDPOINT and MINIO_SECURE") from e

    def _ensure_bucket(self) -> None:
        if self._bucket_ready:
            return
        with self._lock, self._errors():
            if not self._bucket_ready and not self.client.bucket_exists(self.bucket):
                try:
                    self.client.make_bucket(self.bucket)
                except S3Error as e:
                    if e.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):  # a concurrent create won
                        raise
            self._bucket_ready = True

    def _ready(self, key: str) -> str:
        """The checked key, once the bucket exists."""
        check_key(key)
        self._ensure_bucket()
        return key

    def put(self, key: str, source: BinaryIO) -> StoredObject:
        key, reader = self._ready(key), _HashingReader(source)
        tmp = f"{TMP_PREFIX}/{uuid.uuid4().hex}"
        try:
            with self._errors(key, reader):
                # One upload at a time: a failing source stops the upload at once and leaves no threads behind.
                self.client.put_object(self.bucket, tmp, reader, length=-1, part_size=PART_SIZE,
                                       num_parallel_uploads=1)
                self.client.copy_object(self.bucket, key, CopySource(self.bucket, tmp))
        finally:
            self._remove_quietly(tmp)
        return reader.stored(key)

    def _remove_quietly(self, key: str) -> None:
        try:
            self.client.remove_object(self.bucket, key)
        except (MinioException, urllib3.exceptions.HTTPError) as e:  # must not hide the error that brought us here
            log.warning("could not remove temporary object %s from %s: %s", key, self.describe(), e)

    @contextmanager
    def open(self, key: str) -> Iterator[BinaryIO]:
        key = self._ready(key)
        with self._errors(key):
            response = self.client.get_object(self.bucket, key)
        try:
            with self._errors(key):  # a connection lost mid-stream is the store's failure too
                yield response
        finally:
            response.close()
            response.release_conn()

    def exists(self, key: str) -> bool:
        key = self._ready(key)
        try:
            with self._errors(key):
                self.client.stat_object(self.bucket, key)
        except ObjectMissing:
            return False
        return True

    def delete(self, key: str) -> None:
        key = self._ready(key)
        with self._errors(key):
            self.client.remove_object(self.bucket, key)

    def describe(self) -> str:
        return f"s3://{self.bucket} at {self.endpoint}" + (" (TLS)" if self.secure else "")


def storage_from_settings(settings) -> Storage:
    """The configured backend: the S3 bucket when MINIO_ENDPOINT is set, else the local directory."""
    if settings.minio_endpoint:
        return S3Storage(settings.minio_endpoint, settings.minio_access_key, settings.minio_secret_key,
                         settings.minio_bucket, settings.minio_secure)
    return LocalStorage(settings.storage_dir)
