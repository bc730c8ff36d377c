"""Storage backends against real parts: a local directory, and an S3 bucket on a moto server."""
from __future__ import annotations

import hashlib
import io
import os
import threading
import time
import uuid
from pathlib import Path

import pytest
from minio import Minio

from core.errors import Unavailable
from core.settings import Settings
from core.storage import PART_SIZE, LocalStorage, ObjectMissing, S3Storage, Storage, storage_from_settings
from tests import stack

KEY = "workspaces/0123abcd/proj/snapshot.tar.gz"
BIG = PART_SIZE + (1 << 20)  # more than one S3 part: the upload goes multipart


class Boom(Exception):
    pass


class FailingSource(io.RawIOBase):
    """Yields `good` bytes, then fails as a broken pipe or an oversized upload would."""

    def __init__(self, good: bytes) -> None:
        self.data = io.BytesIO(good)

    def read(self, n: int = -1) -> bytes:
        chunk = self.data.read(n)
        if not chunk:
            raise Boom("source broke mid-read")
        return chunk


def new_bucket() -> str:
    return f"t{uuid.uuid4().hex[:12]}"


def raw_client(s3: dict) -> Minio:
    return Minio(s3["endpoint"], access_key=s3["access_key"], secret_key=s3["secret_key"], secure=False)


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path) -> Storage:
    if request.param == "local":
        return LocalStorage(tmp_path / "store")
    s3 = request.getfixturevalue("s3_endpoint")
    return S3Storage(s3["endpoint"], s3["access_key"], s3["secret_key"], new_bucket())


def stored_names(storage: Storage) -> list[str]:
    """Every object the backend holds, temporaries included, listed behind its back."""
    if isinstance(storage, LocalStorage):
        return sorted(p.relative_to(storage.root).as_posix() for p in storage.root.rglob("*") if p.is_file())
    client = raw_client({"endpoint": storage.endpoint, "access_key": "testing", "secret_key": "testing"})
    return sorted(o.object_name for o in client.list_objects(storage.bucket, recursive=True))


def read(storage: Storage, key: str) -> bytes:
    with storage.open(key) as source:
        return source.read()


def test_round_trip_keeps_bytes_and_reports_size_and_sha256(storage, tmp_path):
    data = os.urandom(BIG)
    stored = storage.put(KEY, io.BytesIO(data))
    assert (stored.key, stored.size, stored.sha256) == (KEY, len(data), hashlib.sha256(data).hexdigest())
    assert storage.exists(KEY)
    assert read(storage, KEY) == data
    storage.download(KEY, tmp_path / "out.tar.gz")
    assert (tmp_path / "out.tar.gz").read_bytes() == data
    assert stored_names(storage) == [KEY]


def test_put_file_stores_a_local_file(storage, tmp_path):
    path = tmp_path / "in.bin"
    path.write_bytes(b"hello snapshot")
    stored = storage.put_file("a/b.bin", path)
    assert stored.size == 14 and stored.sha256 == hashlib.sha256(b"hello snapshot").hexdigest()
    assert read(storage, "a/b.bin") == b"hello snapshot"


def test_failing_source_leaves_old_object_and_no_temporary(storage):
    storage.put(KEY, io.BytesIO(b"old"))
    with pytest.raises(Boom):  # the source's own error, not one of the store's
        storage.put(KEY, FailingSource(os.urandom(BIG)))
    assert read(storage, KEY) == b"old"
    assert stored_names(storage) == [KEY]


def test_failing_source_on_new_key_leaves_nothing(storage):
    with pytest.raises(Boom):
        storage.put(KEY, FailingSource(b"x" * 1000))
    assert not storage.exists(KEY)
    assert stored_names(storage) == []


def test_overwrite_replaces_the_content(storage):
    storage.put(KEY, io.BytesIO(b"first version"))
    stored = storage.put(KEY, io.BytesIO(b"second"))
    assert stored.size == 6
    assert read(storage, KEY) == b"second"
    assert stored_names(storage) == [KEY]


def test_missing_key_raises_object_missing(storage, tmp_path):
    with pytest.raises(ObjectMissing) as caught:
        with storage.open("no/such/key"):
            pass
    assert caught.value.status == 404 and caught.value.code == "object_missing"
    with pytest.raises(ObjectMissing):
        storage.download("no/such/key", tmp_path / "out")
    assert list(tmp_path.iterdir()) == ([tmp_path / "store"] if isinstance(storage, LocalStorage) else [])


def test_exists_and_delete(storage):
    assert not storage.exists(KEY)
    storage.delete(KEY)  # missing is fine
    storage.put(KEY, io.BytesIO(b"x"))
    assert storage.exists(KEY)
    assert not storage.exists("workspaces")  # a prefix is not an object
    storage.delete(KEY)
    assert not storage.exists(KEY)
    assert stored_names(storage) == []


@pytest.mark.parametrize("key", ["", "/abs/key", "a/../b", "..", "a/./b", "a//b", "a/", "a\\b", "a\x00b",
                                 ".tmp/x"])
def test_bad_keys_raise_value_error(storage, key):
    for call in (lambda: storage.put(key, io.BytesIO(b"x")), lambda: storage.exists(key),
                 lambda: storage.delete(key), lambda: storage.open(key).__enter__()):
        with pytest.raises(ValueError):
            call()


def test_local_key_cannot_leave_the_root_through_a_symlink(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    storage = LocalStorage(tmp_path / "store")
    (storage.root / "link").symlink_to(outside)
    with pytest.raises(ValueError):
        storage.put("link/file", io.BytesIO(b"x"))
    assert list(outside.iterdir()) == []


def test_s3_creates_its_missing_bucket_once_even_when_racing(s3_endpoint):
    bucket = new_bucket()
    client = raw_client(s3_endpoint)
    assert not client.bucket_exists(bucket)
    stores = [S3Storage(s3_endpoint["endpoint"], "testing", "testing", bucket) for _ in range(4)]
    errors: list[BaseException] = []

    def put(i: int) -> None:
        try:
            stores[i].put(f"k/{i}", io.BytesIO(b"x"))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=put, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert client.bucket_exists(bucket)
    assert sorted(o.object_name for o in client.list_objects(bucket, recursive=True)) == [f"k/{i}" for i in range(4)]


def test_s3_unreachable_raises_unavailable_within_seconds():
    storage = S3Storage(f"127.0.0.1:{stack.free_port()}", "testing", "testing", "nobody-listens")
    started = time.monotonic()
    with pytest.raises(Unavailable) as caught:
        storage.put(KEY, io.BytesIO(b"x"))
    assert time.monotonic() - started < 5
    assert "MINIO_ENDPOINT" in caught.value.message and caught.value.status == 503


def test_s3_bad_endpoint_or_bucket_raises_unavailable_naming_the_setting():
    with pytest.raises(Unavailable, match="MINIO_ENDPOINT"):
        S3Storage("http://host:9000/path", "k", "s", "ccd-workspaces")
    with pytest.raises(Unavailable, match="MINIO_BUCKET"):
        S3Storage("127.0.0.1:9000", "k", "s", "ab")


def test_storage_from_settings_picks_the_backend(tmp_path, s3_endpoint):
    local = storage_from_settings(Settings.from_env({}, jwt_secret="x" * 32, storage_dir=str(tmp_path / "s")))
    assert isinstance(local, LocalStorage) and local.root == Path(tmp_path / "s").resolve()
    s3 = storage_from_settings(Settings.from_env({}, jwt_secret="x" * 32, minio_endpoint=s3_endpoint["endpoint"],
                                                 minio_bucket="ccd-test-settings"))
    assert isinstance(s3, S3Storage) and s3.describe() == f"s3://ccd-test-settings at {s3_endpoint['endpoint']}"
