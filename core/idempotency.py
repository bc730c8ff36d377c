"""Idempotency keys: a retried POST with the same key finds what the first one created."""
from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import delete, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session as DbSession

from core.errors import ValidationFailed, WrongState
from core.models import IdempotencyKey, utcnow

MAX_KEY_LENGTH = 255


@dataclass(frozen=True)
class Prior:
    """What the first request with this key created, and the status it answered with."""

    resource_type: str
    resource_id: uuid.UUID
    status_code: int


def fingerprint(method: str, path: str, body: bytes) -> str:
    return hashlib.sha256(b"\0".join([method.encode(), path.encode(), body])).hexdigest()


def claim(db: DbSession, owner: str, key: str, print_: str) -> Prior | None:
    """Takes the key for this request (None: go ahead and create), or returns the earlier result.

    The insert waits on a concurrent request holding the same key until that one commits, so of
    five simultaneous retries exactly one creates and the others see its result.
    """
    if not key or len(key) > MAX_KEY_LENGTH or "\x00" in key:  # Postgres text holds no NUL
        raise ValidationFailed(f"Idempotency-Key must be 1 to {MAX_KEY_LENGTH} characters, without NUL",
                               field="Idempotency-Key")
    taken = db.execute(insert(IdempotencyKey).values(owner=owner, key=key, fingerprint=print_,
                                                     created_at=utcnow())
                       .on_conflict_do_nothing().returning(IdempotencyKey.key)).first()
    if taken is not None:
        return None
    row = db.scalars(select(IdempotencyKey).where(IdempotencyKey.owner == owner,
                                                  IdempotencyKey.key == key)).one()
    if row.fingerprint != print_:
        raise WrongState("this Idempotency-Key was used with a different request; use a new key",
                         code="idempotency_key_reused")
    return Prior(row.resource_type, row.resource_id, row.status_code)


def remember(db: DbSession, owner: str, key: str, resource_type: str, resource_id: uuid.UUID,
             status_code: int) -> None:
    """Records what the request created; committed with the resource itself."""
    row = db.get(IdempotencyKey, (owner, key))
    row.resource_type, row.resource_id, row.status_code = resource_type, resource_id, status_code


def purge(db: DbSession, older_than: datetime) -> int:
    return db.execute(delete(IdempotencyKey).where(IdempotencyKey.created_at < older_than)).rowcount
