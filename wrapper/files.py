"""Workspace files from inside the session container, confined to /workspace (run as the agent user).

The worker starts it as it starts the turn agent (workers/runtime.py: helper), so no module the agent
wrote runs in its place:

    files get PATH LIMIT              the file's bytes on stdout, at most LIMIT of them
    files put PATH                    stdin becomes the file (parents made, replaced atomically)
    files untar MAX_BYTES MAX_MEMBERS stdin (tar: plain, gzip, bzip2 or xz) unpacked into the workspace;
                                      a JSON summary on stdout
    files archive LIMIT MAX_BYTES     the workspace as tar.gz on stdout, at most LIMIT bytes of it and of
                                      files adding up to at most MAX_BYTES
Paths are walked one component at a time without following symlinks, so neither `..`, an
absolute path nor a symlink can lead outside the workspace. Exit codes: 2 not found, 3 not a
regular file, 4 path refused, 5 bad archive, 6 archive over its caps, 7 download over its limit;
the reason is on stderr.
"""
from __future__ import annotations

import gzip
import json
import os
import shutil
import stat
import sys
import tarfile
import tempfile
import uuid

ROOT = "/workspace"
NOT_FOUND, NOT_A_FILE, REFUSED, BAD_ARCHIVE, ARCHIVE_TOO_LARGE, DOWNLOAD_TOO_LARGE = 2, 3, 4, 5, 6, 7
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
CHUNK = 1 << 20


class Refused(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def parts_of(path: str) -> list[str]:
    """The path's components; refused when absolute, empty, or holding `..`."""
    if not path or path.startswith("/") or "\0" in path:
        raise Refused(REFUSED, f"{path!r}: give a relative path inside the workspace")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        raise Refused(REFUSED, f"{path!r}: '..' and empty paths are not allowed")
    return parts


def open_dir(parts: list[str], create: bool) -> int:
    """A descriptor of the directory `parts` below the workspace, never through a symlink."""
    fd = os.open(ROOT, DIR_FLAGS)
    try:
        for part in parts:
            if create:
                try:
                    os.mkdir(part, 0o755, dir_fd=fd)
                except FileExistsError:
                    pass
            try:
                child = os.open(part, DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                raise Refused(NOT_FOUND, f"{'/'.join(parts)}: no such directory") from None
            except (NotADirectoryError, OSError) as exc:
                raise Refused(REFUSED, f"{'/'.join(parts)}: not a directory inside the workspace ({exc})") from None
            os.close(fd)
            fd = child
        return fd
    except BaseException:
        os.close(fd)
        raise


def get(path: str, out, limit: int) -> None:
    parts = parts_of(path)
    fd = open_dir(parts[:-1], create=False)
    try:
        try:
            # O_NONBLOCK: opening a FIFO the agent made must not wait for a writer.
            file_fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=fd)
        except FileNotFoundError:
            raise Refused(NOT_FOUND, f"{path}: no such file") from None
        except OSError as exc:  # ELOOP: the last part is a symlink
            raise Refused(REFUSED, f"{path}: not a regular file inside the workspace ({exc})") from None
    finally:
        os.close(fd)
    info = os.fstat(file_fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(file_fd)
        raise Refused(NOT_A_FILE, f"{path}: not a regular file")
    if info.st_size > limit:
        os.close(file_fd)
        raise download_too_large(limit)
    os.set_blocking(file_fd, True)
    with os.fdopen(file_fd, "rb") as source:
        shutil.copyfileobj(source, Capped(out, limit, download_too_large), CHUNK)


def archive(out, limit: int, max_unpacked: int) -> None:
    """The whole workspace as tar.gz (symlinks stored as links, never followed), at most `limit` bytes of it, and
    of files that add up to at most `max_unpacked` bytes (as an upload may): a sparse file of a terabyte is refused
    on its size, not read."""
    left = max_unpacked

    def within(info: tarfile.TarInfo) -> tarfile.TarInfo:
        nonlocal left
        left -= info.size
        if left < 0:
            raise Refused(DOWNLOAD_TOO_LARGE, f"the workspace holds more than CCD_MAX_UNPACKED_BYTES "
                                              f"({max_unpacked} bytes); fetch smaller parts with the file API")
        return info

    # gzip level 6, as `tar -z` writes it: level 9 costs far more time for little.
    with gzip.GzipFile(fileobj=Capped(out, limit, download_too_large), mode="wb", compresslevel=6) as packed:
        with tarfile.open(fileobj=packed, mode="w|") as tar:
            tar.add(ROOT, arcname=".", filter=within)


def download_too_large(limit: int) -> Refused:
    return Refused(DOWNLOAD_TOO_LARGE, f"the download is larger than CCD_MAX_DOWNLOAD_BYTES ({limit} bytes); "
                                       "fetch smaller parts with the file API")


def archive_too_large(limit: int) -> Refused:
    return Refused(ARCHIVE_TOO_LARGE, f"the archive is larger than CCD_MAX_UNPACKED_BYTES ({limit} bytes) "
                                      "once decompressed; upload it in parts")


class Capped:
    """A reader or writer that passes at most `limit` bytes, and raises `refuse(limit)` at the first one more
    (reading, it never asks its source for more than one byte past the limit: nothing is decompressed past it)."""

    def __init__(self, inner, limit: int, refuse) -> None:
        self.inner, self.limit, self.left, self.refuse, self.over = inner, limit, limit, refuse, False

    def read(self, size: int = -1) -> bytes:
        size = CHUNK if size is None or size < 0 else size
        chunk = self.inner.read(min(size, self.left + 1))
        if len(chunk) > self.left:
            raise self.refuse(self.limit)
        self.left -= len(chunk)
        return chunk

    def write(self, data) -> int:
        if self.over:  # refused already: what a closing writer still flushes is dropped, not refused again
            return len(data)
        if len(data) > self.left:
            self.over = True
            raise self.refuse(self.limit)
        self.left -= len(data)
        return self.inner.write(data)

    def flush(self) -> None:
        self.inner.flush()


def put(path: str, source, mode: int = 0o644) -> int:
    """Writes the file through a temporary name, then renames it over any old file (or symlink)."""
    parts = parts_of(path)
    fd = open_dir(parts[:-1], create=True)
    temp = f".ccd-upload-{uuid.uuid4().hex}"
    size = 0
    try:
        file_fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode & 0o777, dir_fd=fd)
        with os.fdopen(file_fd, "wb") as target:
            while chunk := source.read(1 << 20):
                target.write(chunk)
                size += len(chunk)
        try:
            if stat.S_ISDIR(os.stat(parts[-1], dir_fd=fd, follow_symlinks=False).st_mode):
                raise Refused(NOT_A_FILE, f"{path}: is a directory")
        except FileNotFoundError:
            pass
        os.rename(temp, parts[-1], src_dir_fd=fd, dst_dir_fd=fd)
        return size
    finally:
        try:
            os.unlink(temp, dir_fd=fd)
        except FileNotFoundError:
            pass
        os.close(fd)


def untar(source, max_bytes: int, max_members: int) -> dict:
    """Reads the whole archive once, writing nothing (so a refused archive leaves the workspace as it was),
    then again to write it."""
    with tempfile.TemporaryFile() as spool:
        shutil.copyfileobj(source, spool, CHUNK)
        try:
            targets = Targets()
            for member, data in members(spool, max_bytes, max_members):
                targets.check(parts_of(member.name), member.isdir())
                while data is not None and data.read(CHUNK):
                    pass
        except Refused:
            raise
        except Exception as exc:  # whatever the decompressors or tarfile raise on bad input
            raise Refused(BAD_ARCHIVE, f"not a readable tar archive: {exc}") from None
        files = size = 0
        for member, data in members(spool, max_bytes, max_members):
            if data is None:
                os.close(open_dir(parts_of(member.name), create=True))
                continue
            size += put(member.name, data, member.mode)
            files += 1
        return {"files": files, "bytes": size}


class Targets:
    """Where an archive's members would go, checked before anything is written: refused when a file and a
    directory of the archive share a path, or the workspace has a symlink or a file where a directory must be
    (or a directory where a file must go). Writing checks again, through descriptors (see `open_dir`)."""

    def __init__(self) -> None:
        self.files: set[str] = set()
        self.dirs: set[str] = set()  # checked already

    def check(self, parts: list[str], is_dir: bool) -> None:
        for end in range(1, len(parts) + (1 if is_dir else 0)):
            self.directory("/".join(parts[:end]))
        if not is_dir:
            self.file("/".join(parts))

    def directory(self, path: str) -> None:
        if path in self.dirs:
            return
        if path in self.files:
            raise Refused(NOT_A_FILE, f"{path}: both a file and a directory in the archive")
        try:
            if not stat.S_ISDIR(os.lstat(os.path.join(ROOT, path)).st_mode):
                raise Refused(REFUSED, f"{path}: not a directory inside the workspace (a file or a symlink)")
        except FileNotFoundError:
            pass
        self.dirs.add(path)

    def file(self, path: str) -> None:
        if path in self.dirs:
            raise Refused(NOT_A_FILE, f"{path}: is a directory")
        try:
            if stat.S_ISDIR(os.lstat(os.path.join(ROOT, path)).st_mode):
                raise Refused(NOT_A_FILE, f"{path}: is a directory")
        except FileNotFoundError:
            pass
        self.files.add(path)


def members(spool, max_bytes: int, max_members: int):
    """The archive's members, each checked before its data is read, as (member, its data or None for a
    directory): regular files and directories only, at most `max_members` of them, and the tar stream at most
    `max_bytes` once decompressed (read as it is decompressed, so a bomb stops at the cap)."""
    spool.seek(0)
    stream = Capped(decompressed(spool), max_bytes, archive_too_large)
    with tarfile.open(fileobj=stream, mode="r|") as tar:
        for count, member in enumerate(tar, 1):
            if count > max_members:
                raise Refused(ARCHIVE_TOO_LARGE, f"the archive has more than CCD_MAX_ARCHIVE_MEMBERS "
                                                 f"({max_members}) members; upload it in parts")
            allowed(member)
            if member.size > stream.left:  # refused on its header: its data is never decompressed
                raise archive_too_large(max_bytes)
            yield member, tar.extractfile(member) if member.isfile() else None


def allowed(member: tarfile.TarInfo) -> None:
    """Refuses a member that is not a plain regular file or directory inside the workspace."""
    if member.issparse() or any(key.startswith("GNU.sparse.") for key in member.pax_headers):
        raise Refused(BAD_ARCHIVE, f"{member.name}: sparse files may not be uploaded")
    if member.issym() or member.islnk():
        raise Refused(BAD_ARCHIVE, f"{member.name}: links may not be uploaded; only regular files and directories")
    if not (member.isfile() or member.isdir()):
        raise Refused(BAD_ARCHIVE, f"{member.name}: devices and fifos may not be uploaded; only regular files "
                                   "and directories")
    parts_of(member.name)


def decompressed(spool):
    """The archive's tar stream: gzip, bzip2 and xz are read as they are decompressed."""
    magic = spool.read(6)
    spool.seek(0)
    if magic.startswith(b"\x1f\x8b"):
        return gzip.GzipFile(fileobj=spool, mode="rb")
    if magic.startswith(b"BZh"):
        import bz2

        return bz2.BZ2File(spool)
    if magic.startswith(b"\xfd7zXZ\x00"):
        import lzma

        return lzma.LZMAFile(spool)
    return spool


def main(argv: list[str]) -> int:
    os.umask(0o022)
    try:
        if len(argv) == 3 and argv[0] == "get" and argv[2].isdigit():
            get(argv[1], sys.stdout.buffer, int(argv[2]))
        elif len(argv) == 2 and argv[0] == "put":
            print(json.dumps({"bytes": put(argv[1], sys.stdin.buffer)}))
        elif len(argv) == 3 and argv[0] == "untar" and argv[1].isdigit() and argv[2].isdigit():
            print(json.dumps(untar(sys.stdin.buffer, int(argv[1]), int(argv[2]))))
        elif len(argv) == 3 and argv[0] == "archive" and argv[1].isdigit() and argv[2].isdigit():
            archive(sys.stdout.buffer, int(argv[1]), int(argv[2]))
        else:
            print("usage: files get PATH LIMIT | put PATH | untar MAX_BYTES MAX_MEMBERS | archive LIMIT MAX_BYTES",
                  file=sys.stderr)
            return 64
    except Refused as exc:
        print(str(exc), file=sys.stderr)
        return exc.code
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
