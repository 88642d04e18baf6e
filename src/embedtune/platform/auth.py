"""API keys, who may touch which workspace, and the audit log.

A token is ``etk-<id>-<secret>``: ``id`` (12 hex) names the row, ``secret`` is 32 random bytes from
:mod:`secrets` (256 bits). Only HMAC-SHA256(token) is stored and compared with :func:`hmac.compare_digest`.
A slow password hash (scrypt, argon2) exists to make guessing *low-entropy* secrets expensive; a 256-bit
random secret cannot be guessed however fast the hash, and a slow hash on every request would hand an
anonymous client a CPU-exhaustion lever. The HMAC key is a fixed domain label: it separates these digests
from any other SHA-256 use, it is not a secret (a pepper would have to be shared by every replica).

Every route but health requires ``Authorization: Bearer <token>``. The check runs in an ASGI middleware,
before a request body is read (an anonymous client cannot make the service spool an upload), and the
route's dependencies then decide per workspace: an admin key sees every workspace; another key only those
it was created for. A workspace the key may not see answers 404, exactly as one that does not exist.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import secrets
import sys
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from embedtune.platform import db
from embedtune.platform.errors import PlatformError

TOKEN_PREFIX = "etk"
ADMIN_KEY_FILE = "admin.key"
_DOMAIN = b"embedtune-platform-api-key-v1"
_DUMMY = hmac.new(_DOMAIN, b"no such key", hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class Principal:
    """The caller as the routes see it."""

    key_id: str
    name: str
    admin: bool
    workspaces: frozenset[str] = field(default_factory=frozenset)

    def can_use(self, workspace: str) -> bool:
        return self.admin or workspace in self.workspaces

    @property
    def actor(self) -> str:
        return f"{self.key_id} ({self.name})"


ANONYMOUS = Principal(key_id="anonymous", name="auth disabled", admin=True)


def digest(token: str) -> str:
    return hmac.new(_DOMAIN, token.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()


def new_token() -> tuple[str, str]:
    """(key id, token)."""
    key_id = f"key{secrets.token_hex(6)}"
    return key_id, f"{TOKEN_PREFIX}-{key_id}-{secrets.token_urlsafe(32)}"


def key_id_of(token: str) -> str | None:
    parts = token.split("-")
    if len(parts) < 3 or parts[0] != TOKEN_PREFIX or len(parts[1]) != 15 or not parts[1].isascii():
        return None
    return parts[1]


def create_key(s: Session, name: str, *, admin: bool = False, workspaces: list[str] | None = None,
               actor: str = "cli") -> tuple[db.ApiKey, str]:
    """Record a new key; the token is returned once and never stored."""
    key_id, token = new_token()
    row = db.ApiKey(id=key_id, name=name, secret_hash=digest(token), admin=admin,
                    workspaces=sorted(set(workspaces or [])))
    s.add(row)
    audit(s, actor, "create", "api_key", key_id, detail={"name": name, "admin": admin,
                                                          "workspaces": row.workspaces})
    s.commit()
    return row, token


def revoke_key(s: Session, key_id: str, actor: str = "cli") -> db.ApiKey | None:
    row = s.get(db.ApiKey, key_id)
    if row is None:
        return None
    if row.revoked_at is None:
        row.revoked_at = db.utcnow()
        audit(s, actor, "revoke", "api_key", key_id, detail={"name": row.name})
        s.commit()
    return row


def authenticate(s: Session, token: str) -> Principal | None:
    """The key's principal, or None for an unknown, wrong or revoked token (same work either way)."""
    key_id = key_id_of(token)
    row = s.get(db.ApiKey, key_id) if key_id else None
    expected = row.secret_hash if row is not None else _DUMMY
    ok = hmac.compare_digest(digest(token), expected)
    if not ok or row is None or row.revoked_at is not None:
        return None
    return Principal(key_id=row.id, name=row.name, admin=row.admin, workspaces=frozenset(row.workspaces or []))


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def unauthorized(message: str) -> PlatformError:
    return PlatformError(401, message, code="invalid_api_key")


def forbidden(message: str) -> PlatformError:
    return PlatformError(403, message, code="forbidden")


# ------------------------------------------------------------------------------------------ bootstrap


def ensure_admin_key(sessions: sessionmaker[Session], data_dir: Path) -> str | None:
    """On a first start (no live admin key), create one, write it to a 0600 file and return the token."""
    with sessions() as s:
        live = s.scalar(select(db.ApiKey.id).where(db.ApiKey.admin.is_(True), db.ApiKey.revoked_at.is_(None)))
        if live:
            return None
        _, token = create_key(s, "admin", admin=True, actor="service")
    write_secret_file(data_dir / ADMIN_KEY_FILE, token)
    return token


def write_secret_file(path: Path, content: str) -> None:
    """Write ``content`` to a file only its owner can read (created 0600, never world-readable meanwhile)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, (content + "\n").encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)


def announce_admin_key(token: str, path: Path) -> None:
    """Printed once, as Jupyter prints its token; afterwards only the file holds it."""
    print(f"\n  embedtune platform: created the admin API key (shown once; also in {path}, mode 0600):\n"
          f"      {token}\n  use it as 'Authorization: Bearer <key>' or EMBEDTUNE_API_KEY.\n",
          file=sys.stderr, flush=True)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_auth_setting(auth: bool, host: str) -> None:
    if not auth and not is_loopback(host):
        raise ValueError(f"refusing to listen on {host} without authentication: --no-auth is only allowed on a "
                         "loopback address (127.0.0.1, ::1, localhost)")


# ------------------------------------------------------------------------------------------- audit


def audit(s: Session, actor: Principal | str, action: str, kind: str, target: str, *,
          workspace: str | None = None, detail: dict[str, Any] | None = None) -> None:
    """Add an audit row to the session; it is committed with the change it describes."""
    who = actor.actor if isinstance(actor, Principal) else actor
    s.add(db.AuditEvent(at=db.utcnow(), actor=who, action=action, kind=kind, target=target, workspace=workspace,
                        detail=detail or {}))


def key_summary(row: db.ApiKey) -> dict[str, Any]:
    def iso(value: datetime | None) -> str | None:
        return value.isoformat() + "Z" if value else None

    return {"id": row.id, "name": row.name, "admin": row.admin, "workspaces": row.workspaces,
            "created_at": iso(row.created_at), "revoked_at": iso(row.revoked_at)}
