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

log = logging.getLogger(__name__)

# What a snapshot holds: container path -> name inside the archive (relative to /, for `tar -C /`).
SAVED_PATHS = {"/workspace": "workspace", "/home/agent": "home/agent"}
# Turn logs and cancel markers belong to the container they ran in, not to the workspace.
SKIPPED = ("home/agent/.ccd",)
RESTORE = ["sh", "-c", "find /workspace /home/agent -mindepth 1 -delete && tar -xzf - -C /"]


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


def write_snapshot(ctx: WorkerContext, session_id: str, out: BinaryIO) -> bool:
    """Writes the container's saved paths to `out` as one tar.gz; False when there is no container."""
    with tarfile.open(fileobj=out, mode="w|gz") as dst:
        for path, name in SAVED_PATHS.items():
            chunks = ctx.runtime.archive(session_id, path)
            if chunks is None:
                return False
            with tarfile.open(fileobj=io.BufferedReader(ChunkReader(chunks), 1 << 20), mode="r|") as src:
                for member in src:
                    # Docker names entries after the last path part ("agent/..."); file them under `name`.
                    member.name = name + member.name[len(path.rsplit("/", 1)[1]):]
                    if member.name.startswith(SKIPPED):
                        continue
                    dst.addfile(member, src.extractfile(member) if member.isfile() else None)
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
    with tempfile.TemporaryFile() as spool:
        if not write_snapshot(ctx, session_id, spool):
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
    with tempfile.TemporaryFile() as spool:
        digest = hashlib.sha256()
        with ctx.storage.open(key) as source:
            while chunk := source.read(1 << 20):
                digest.update(chunk)
                spool.write(chunk)
        if digest.hexdigest() != checksum:
            raise DomainError(f"the snapshot of workspace {row.workspace['name']!r} does not match its "
                              "recorded checksum; it was not restored", code="snapshot_corrupt")
        spool.seek(0)
        result = ctx.runtime.exec_io(container_id, RESTORE, stdin=spool)
    if result.exit_code != 0:
        raise DomainError(f"restoring the workspace failed (exit {result.exit_code}): {result.stderr[-500:]}",
                          code="restore_failed")
    with transaction(ctx.db) as db:
        row = db.get(Session, uuid.UUID(session_id), with_for_update=True)
        row.workspace = {**row.workspace, "generation": generation}
    log.info("session %s: workspace restored from generation %d", session_id, generation)
    return True
