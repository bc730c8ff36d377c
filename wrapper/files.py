"""Workspace files from inside the session container, confined to /workspace (run as the agent user).

    python3 -m wrapper.files get PATH    the file's bytes on stdout
    python3 -m wrapper.files put PATH    stdin becomes the file (parents made, replaced atomically)
    python3 -m wrapper.files untar       stdin (tar, gzip or not) unpacked into the workspace;
                                         a JSON summary on stdout
Paths are walked one component at a time without following symlinks, so neither `..`, an
absolute path nor a symlink can lead outside the workspace. Exit codes: 2 not found, 3 not a
regular file, 4 path refused, 5 bad archive; the reason is on stderr.
"""
from __future__ import annotations

import json
import os
import stat
import sys
import tarfile
import tempfile
import uuid

ROOT = "/workspace"
NOT_FOUND, NOT_A_FILE, REFUSED, BAD_ARCHIVE = 2, 3, 4, 5
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW


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


def get(path: str, out) -> None:
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
    if not stat.S_ISREG(os.fstat(file_fd).st_mode):
        os.close(file_fd)
        raise Refused(NOT_A_FILE, f"{path}: not a regular file")
    os.set_blocking(file_fd, True)
    with os.fdopen(file_fd, "rb") as source:
        while chunk := source.read(1 << 20):
            out.write(chunk)


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


def untar(source) -> dict:
    """Checks every member first (regular files and directories only), then writes them."""
    with tempfile.TemporaryFile() as spool:
        while chunk := source.read(1 << 20):
            spool.write(chunk)
        spool.seek(0)
        try:
            archive = tarfile.open(fileobj=spool, mode="r:*")
            members = archive.getmembers()
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise Refused(BAD_ARCHIVE, f"not a readable tar archive: {exc}") from None
        for member in members:
            if not (member.isfile() or member.isdir()):
                raise Refused(BAD_ARCHIVE, f"{member.name}: only regular files and directories may be uploaded")
            parts_of(member.name)
        files = size = 0
        for member in members:
            if member.isdir():
                os.close(open_dir(parts_of(member.name), create=True))
                continue
            size += put(member.name, archive.extractfile(member), member.mode)
            files += 1
        return {"files": files, "bytes": size}


def main(argv: list[str]) -> int:
    os.umask(0o022)
    try:
        if len(argv) == 2 and argv[0] == "get":
            get(argv[1], sys.stdout.buffer)
        elif len(argv) == 2 and argv[0] == "put":
            print(json.dumps({"bytes": put(argv[1], sys.stdin.buffer)}))
        elif argv == ["untar"]:
            print(json.dumps(untar(sys.stdin.buffer)))
        else:
            print("usage: python3 -m wrapper.files get PATH | put PATH | untar", file=sys.stderr)
            return 64
    except Refused as exc:
        print(str(exc), file=sys.stderr)
        return exc.code
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
