"""Persistent workspaces on this host: save a stopped container's workspace and agent home as a
snapshot in object storage, and restore the newest snapshot into a container that starts."""
from __future__ import annotations

import hashlib
import io
import logging
import tarfile
import tempfile
import uuid
from typing import BinaryIO, Iterator

from core import workspaces
from core.db import transaction
from core.errors import DomainError
from core.models import Session
from workers.context import WorkerContext
from workers.runtime import disk_limit_mb
from wrapper.files import Capped

log = logging.getLogger(__name__)

# What a snapshot holds: container path -> name inside the archive (relative to /, for `tar -C /`).
SAVED_PATHS = {"/workspace": "workspace", "/home/agent": "home/agent"}
# Turn logs and cancel markers belong to the container they ran in, not to the workspace.
SKIPPED = ("home/agent/.ccd",)
# Members the restore leaves out come after "$@" as --exclude options (literal, anchored names). GNU tar never
# writes through a symlink it extracts (absolute or `..` ones are placeholders until the end), and runs as the agent.
RESTORE = ["sh", "-c", 'find /workspace /home/agent -mindepth 1 -delete && exec tar -xzf - -C / --no-same-owner '
           '--anchored --no-wildcards "$@"', "restore"]
MAX_EXCLUDED = 1000  # members left out of one restore, each an argument of tar


class SnapshotTooLarge(DomainError):
    """The workspace's files add up to more than the session's disk limit: no snapshot is made (or restored)."""

    code = "snapshot_too_large"


def snapshot_limit(config: dict, settings) -> int:
    """The most a snapshot may hold, in bytes of its files and of the archive alike: the session's disk limit
    (config.limits.disk_mb), which its volumes are held to; only sparse files can add up to more."""
    return disk_limit_mb(config, settings) << 20


def too_large(limit: int, outcome: str = "it was not saved; the previous snapshot stays the newest") -> SnapshotTooLarge:
    return SnapshotTooLarge(f"the workspace's files add up to more than the session's disk limit ({limit} bytes, "
                            f"config.limits.disk_mb; a sparse file counts at its full size): {outcome}")


def inside(name: str) -> bool:
    """A member name under one of the saved paths, without `..` or an absolute path."""
    parts = name.split("/")
    return not name.startswith("/") and ".." not in parts and any(
        name == saved or name.startswith(saved + "/") for saved in SAVED_PATHS.values())


def kept(member: tarfile.TarInfo) -> bool:
    """Whether a snapshot holds (and a restore writes) the member: regular files, directories and symlinks, and
    hard links to other members; no devices, fifos, sparse files or links that lead outside the saved paths."""
    if member.issparse() or any(key.startswith("GNU.sparse.") for key in member.pax_headers):
        return False
    if member.islnk():
        return inside(member.name) and inside(member.linkname)
    return (member.isfile() or member.isdir() or member.issym()) and inside(member.name)


class ChunkReader(io.RawIOBase):
    """A file-like view of an iterator of byte chunks (what Docker's archive call returns);
    memoryview slices, so reading a large chunk in small pieces copies each byte once."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks, self._pending = iter(chunks), memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self._pending:
            chunk = next(self._chunks, None)
            if chunk is None:
                return 0
            self._pending = memoryview(chunk)
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n


def write_snapshot(ctx: WorkerContext, session_id: str, out: BinaryIO, limit: int) -> bool:
    """Writes the container's saved paths to `out` as one tar.gz; False when there is no container.
    SnapshotTooLarge at the first member past `limit` bytes of files, read from its header (a sparse terabyte is
    refused, not read), or once the archive passes `limit`: at most `limit` bytes are ever written to `out`."""
    left = limit
    with tarfile.open(fileobj=Capped(out, limit, too_large), mode="w|gz") as dst:
        for path, name in SAVED_PATHS.items():
            chunks = ctx.runtime.archive(session_id, path)
            if chunks is None:
                return False
            try:
                with tarfile.open(fileobj=io.BufferedReader(ChunkReader(chunks), 1 << 20), mode="r|") as src:
                    for member in src:
                        # Docker names entries after the last path part ("agent/..."); file them under `name`.
                        base = path.rsplit("/", 1)[1]
                        member.name = name + member.name[len(base):]
                        if member.islnk() and (member.linkname + "/").startswith(base + "/"):
                            member.linkname = name + member.linkname[len(base):]
                        if member.name.startswith(SKIPPED):
                            continue
                        if not kept(member):
                            log.info("session %s: %s is not a file, directory or link inside the workspace; not "
                                     "saved", session_id, member.name)
                            continue
                        left -= member.size
                        if left < 0:
                            raise too_large(limit)
                        dst.addfile(member, src.extractfile(member) if member.isfile() else None)
            finally:
                chunks.close()  # stops the engine's read of the rest (a refused sparse file is never read)
    return True


def save(ctx: WorkerContext, session_id: str) -> None:
    """Snapshots a stopped session's persistent workspace and records it as the newest generation."""
    with transaction(ctx.db) as db:
        row = db.get(Session, uuid.UUID(session_id))
        if row is None or not workspaces.is_persistent(row.workspace):
            return
        held = workspaces.get(db, row.owner, row.workspace["name"])
        if held is None or held.holder_id != row.id:
            # Stopped earlier (its snapshot is saved) and perhaps taken over since: nothing of ours to save.
            log.info("session %s does not hold workspace %r; not saving it", session_id, row.workspace["name"])
            return
        key = workspaces.snapshot_key(row.owner, row.workspace["name"])
        limit = snapshot_limit(row.config, ctx.settings)
    with tempfile.TemporaryFile() as spool:
        if not write_snapshot(ctx, session_id, spool, limit):
            log.warning("session %s: no container to snapshot; the workspace keeps its last snapshot", session_id)
            return
        spool.seek(0)
        stored = ctx.storage.put(key, spool)
    with transaction(ctx.db) as db:
        row = db.get(Session, uuid.UUID(session_id), with_for_update=True)
        generation = workspaces.record_snapshot(db, row, stored.key, stored.size, stored.sha256)
    log.info("session %s: workspace %r saved (generation %d, %d bytes)", session_id, row.workspace["name"],
             generation, stored.size)


def restore(ctx: WorkerContext, session_id: str, container_id: str, fresh: bool = False) -> bool:
    """Puts the workspace's newest snapshot into the container, unless it already has it
    (a `fresh` container, just created, has nothing yet)."""
    with transaction(ctx.db) as db:
        row = db.get(Session, uuid.UUID(session_id))
        if row is None or not workspaces.is_persistent(row.workspace):
            return False
        saved = workspaces.get(db, row.owner, row.workspace["name"])
        if saved is None or saved.snapshot_key is None:
            return False
        if not fresh and saved.generation == row.workspace.get("generation", 0):
            return False
        key, checksum, generation = saved.snapshot_key, saved.sha256, saved.generation
        limit = snapshot_limit(row.config, ctx.settings)
    with tempfile.TemporaryFile() as spool:
        digest = hashlib.sha256()
        with ctx.storage.open(key) as source:
            while chunk := source.read(1 << 20):
                digest.update(chunk)
                spool.write(chunk)
        if digest.hexdigest() != checksum:
            raise DomainError(f"the snapshot of workspace {row.workspace['name']!r} does not match its "
                              "recorded checksum; it was not restored", code="snapshot_corrupt")
        excluded = unwritten(spool, limit)
        spool.seek(0)
        result = ctx.runtime.exec_io(container_id, RESTORE + [f"--exclude={name}" for name in excluded], stdin=spool)
    if result.exit_code != 0:
        raise DomainError(f"restoring the workspace failed (exit {result.exit_code}): {result.stderr[-500:]}",
                          code="restore_failed")
    with transaction(ctx.db) as db:
        row = db.get(Session, uuid.UUID(session_id), with_for_update=True)
        row.workspace = {**row.workspace, "generation": generation}
    log.info("session %s: workspace restored from generation %d", session_id, generation)
    return True


def unwritten(spool: BinaryIO, limit: int) -> list[str]:
    """Reads the snapshot through once before it is restored: the names of members a restore must leave out (see
    `kept`; a snapshot saved before they were left out may hold them); SnapshotTooLarge when its files add up to
    more than `limit` bytes (the restoring session's disk limit), checked on each header before its data is read."""
    spool.seek(0)
    left, excluded = limit, []
    with tarfile.open(fileobj=spool, mode="r|gz") as tar:
        for member in tar:
            if not kept(member):
                excluded.append(member.name)
                continue
            left -= member.size
            if left < 0:
                raise too_large(limit, "it was not restored; give the session a larger limits.disk_mb")
    if len(excluded) > MAX_EXCLUDED:
        raise DomainError(f"the snapshot holds {len(excluded)} devices, fifos, sparse files or links leading "
                          f"outside the workspace (at most {MAX_EXCLUDED} are left out); it was not restored",
                          code="restore_failed")
    if excluded:
        log.warning("restoring a snapshot without %d members that are not files, directories or links inside the "
                    "workspace: %s", len(excluded), ", ".join(excluded[:10]))
    return excluded
