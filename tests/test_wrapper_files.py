"""wrapper/files.py on its own: how far an archive bomb is decompressed before it is refused (what the end-to-end
tests in test_files_hardening_e2e.py cannot see from outside the container)."""
from __future__ import annotations

import io
import tarfile

import pytest

from wrapper import files

CAP = 1 << 20


class Counting:
    """Counts the bytes read through it: how much of the archive was decompressed."""

    def __init__(self, inner) -> None:
        self.inner, self.seen = inner, 0

    def read(self, size: int = -1) -> bytes:
        chunk = self.inner.read(size)
        self.seen += len(chunk)
        return chunk


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """The helper's /workspace in a temporary directory, and a counter of the bytes it decompresses."""
    monkeypatch.setattr(files, "ROOT", str(tmp_path))
    counters = []

    def counted(spool):
        counters.append(Counting(original(spool)))
        return counters[-1]

    original = files.decompressed
    monkeypatch.setattr(files, "decompressed", counted)
    return tmp_path, counters


def gzipped(*members: tuple[tarfile.TarInfo, io.RawIOBase | None]) -> io.BytesIO:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz", compresslevel=9) as archive:
        for info, data in members:
            archive.addfile(info, data)
    out.seek(0)
    return out


def regular(name: str, size: int, **attrs) -> tuple[tarfile.TarInfo, io.BytesIO]:
    info = tarfile.TarInfo(name)
    info.size = size
    for key, value in attrs.items():
        setattr(info, key, value)
    return info, io.BytesIO(bytes(size))


def test_a_member_past_the_cap_is_refused_on_its_header_before_its_data_is_decompressed(workspace):
    root, counters = workspace
    bomb = gzipped(regular("first.txt", 10), regular("zeros", 64 << 20))
    with pytest.raises(files.Refused) as refused:
        files.untar(bomb, CAP, 100)
    assert refused.value.code == files.ARCHIVE_TOO_LARGE
    assert counters[0].seen < 64 << 10  # two headers and a little data, none of the 64 MiB
    assert list(root.iterdir()) == []


def test_a_header_bomb_is_decompressed_no_further_than_one_byte_past_the_cap(workspace):
    root, counters = workspace
    bomb = gzipped(regular("first.txt", 10, pax_headers={"comment": "x" * (32 << 20)}))
    with pytest.raises(files.Refused) as refused:
        files.untar(bomb, CAP, 100)
    assert refused.value.code == files.ARCHIVE_TOO_LARGE
    assert counters[0].seen <= CAP + 1
    assert list(root.iterdir()) == []


def test_an_archive_within_the_caps_is_read_once_to_check_and_once_to_write(workspace):
    root, counters = workspace
    summary = files.untar(gzipped(regular("a/b.bin", 1000), regular("c.bin", 24)), CAP, 2)
    assert summary == {"files": 2, "bytes": 1024}
    assert (root / "a" / "b.bin").stat().st_size == 1000 and len(counters) == 2


@pytest.mark.parametrize("blocked, code", [("link/evil", files.REFUSED), ("plain.txt/evil", files.REFUSED),
                                           ("adir", files.NOT_A_FILE), ("first.txt/x", files.NOT_A_FILE)])
def test_a_member_that_cannot_be_written_refuses_the_archive_before_anything_is_written(workspace, blocked, code):
    root, _counters = workspace
    (root / "link").symlink_to("/etc")
    (root / "plain.txt").write_bytes(b"x")
    (root / "adir").mkdir()
    before = sorted(p.name for p in root.iterdir())
    with pytest.raises(files.Refused) as refused:
        files.untar(gzipped(regular("first.txt", 5), regular(blocked, 3)), CAP, 100)
    assert refused.value.code == code
    assert sorted(p.name for p in root.iterdir()) == before
