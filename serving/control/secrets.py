"""Secrets: the Databricks secrets API with scope ACLs, encrypted at rest, used only by readers.

Why ACLs: an endpoint config names a secret by reference (``{{secrets/scope/key}}``) and the
server then sends the value to the config's provider URL. Without a check, anyone who may create
an endpoint could point a reference at someone else's key and a base URL of their own. So, as in
Databricks, every scope has an ACL (READ < WRITE < MANAGE, the strongest entry for the user or
the ``users`` group applies; admins hold MANAGE everywhere), and a reference is accepted, and
later resolved, only for a principal who may READ its scope. To someone who may not read a scope,
a missing scope and a forbidden one look the same: errors never tell whether it or its keys exist.

Values are Fernet-encrypted with a key from ``SQLINFER_SECRET_KEY`` or the key file
``$SQLINFER_HOME/secret.key`` (mode 0600). The file is generated only while nothing encrypted
exists: a missing or corrupt key file with encrypted secrets in the store stops secret use with
an error that names the file and how to restore it (and ``sqlinfer doctor`` says so), instead of
silently writing a new key that can decrypt nothing. ``*_plaintext`` fields of endpoint configs
are sealed with the same key (:meth:`SecretStore.seal`) so the store never holds a secret in clear.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from serving.control.auth import EMBEDDED, Principal
from serving.control.db import Database
from serving.control.wire import SECRET_REFERENCE
from serving.errors import (
    InvalidParameterValue,
    PermissionDenied,
    ResourceAlreadyExists,
    ResourceDoesNotExist,
    SecretKeyUnavailable,
)

PERMISSIONS = ("READ", "WRITE", "MANAGE")
ALL_USERS = "users"  # the group every user belongs to, as in Databricks ACLs
SEALED = "__sealed__"  # marks a sealed value inside a stored endpoint config


@dataclass(frozen=True)
class KeyStatus:
    """What ``sqlinfer doctor`` reports about the secret key."""

    source: str  # "SQLINFER_SECRET_KEY" or the key file's path
    ok: bool
    problem: str | None
    encrypted_values: int


class SecretKey:
    """The Fernet key, loaded on first use; never regenerated while encrypted values exist."""

    def __init__(self, db: Database, home: Path):
        self._db, self.path = db, home / "secret.key"
        self._fernet: Any = None
        self._lock = threading.Lock()

    def encrypted_values(self) -> int:
        """Secrets plus sealed config values that only the current key can decrypt."""
        con = self._db.read()
        secrets = con.execute("SELECT count(*) FROM secrets").fetchone()[0]
        sealed = con.execute("SELECT count(*) FROM endpoints WHERE config_json LIKE ? OR pending_config_json LIKE ?",
                             (f"%{SEALED}%", f"%{SEALED}%")).fetchone()[0]
        return int(secrets) + int(sealed)

    def fernet(self) -> Any:
        with self._lock:
            if self._fernet is None:
                self._fernet = self._load()
            return self._fernet

    def status(self) -> KeyStatus:
        source = "SQLINFER_SECRET_KEY" if os.environ.get("SQLINFER_SECRET_KEY") else str(self.path)
        try:
            self._load(create=False)
        except SecretKeyUnavailable as exc:
            return KeyStatus(source, False, exc.message, self.encrypted_values())
        return KeyStatus(source, True, None, self.encrypted_values())

    def _load(self, create: bool = True) -> Any:
        from cryptography.fernet import Fernet

        configured = os.environ.get("SQLINFER_SECRET_KEY")
        if configured:
            return self._fernet_of(configured.encode(), "the SQLINFER_SECRET_KEY variable")
        if not self.path.exists():
            stored = self.encrypted_values()
            if stored:
                raise SecretKeyUnavailable(
                    f"the secret key file {str(self.path)!r} is missing, but {stored} encrypted value(s) in the "
                    f"store need it; restore the file from a backup (or set SQLINFER_SECRET_KEY to the key) and "
                    f"restart. A new key would decrypt none of them, so none is generated")
            if not create:
                return None
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # O_EXCL: if two processes race, one creates the key and the other reads it.
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                pass
            else:
                with os.fdopen(fd, "wb") as handle:
                    handle.write(Fernet.generate_key())
        for _ in range(50):  # the winner of a race may still be writing
            key = self.path.read_bytes().strip()
            if key:
                return self._fernet_of(key, f"the secret key file {str(self.path)!r}")
            time.sleep(0.01)
        return self._fernet_of(b"", f"the secret key file {str(self.path)!r}")

    @staticmethod
    def _fernet_of(key: bytes, where: str) -> Any:
        from cryptography.fernet import Fernet

        try:
            return Fernet(key)
        except ValueError:
            raise SecretKeyUnavailable(
                f"{where} does not hold a valid key (32 url-safe base64-encoded bytes); restore the original key "
                f"from a backup and restart. Secrets cannot be used until then") from None

    def encrypt(self, value: str) -> bytes:
        return self.fernet().encrypt(value.encode())

    def decrypt(self, ciphertext: bytes, what: str) -> str:
        from cryptography.fernet import InvalidToken

        try:
            return self.fernet().decrypt(ciphertext).decode()
        except InvalidToken:
            source = "SQLINFER_SECRET_KEY" if os.environ.get("SQLINFER_SECRET_KEY") else repr(str(self.path))
            raise SecretKeyUnavailable(
                f"{what} cannot be decrypted with the key in {source}: the key is not the one it was encrypted "
                f"with; restore the original key from a backup and restart") from None


def _changed(con) -> None:
    """Within a write: secrets or their ACLs changed (backends re-resolve their keys)."""
    con.execute("UPDATE secret_generation SET generation = generation + 1 WHERE id = 1")


class SecretStore:
    def __init__(self, db: Database, home: Path):
        self._db = db
        self.key = SecretKey(db, home)

    # -- sealing values that live inside endpoint configs -----------------------------------

    def seal(self, value: str) -> str:
        return self.key.encrypt(value).decode()

    def unseal(self, token: str) -> str:
        return self.key.decrypt(token.encode(), "a sealed *_plaintext value of an endpoint config")

    # -- permissions -------------------------------------------------------------------------

    def permission(self, principal: Principal, scope: str, con=None) -> str | None:
        """The strongest permission ``principal`` holds on ``scope`` (directly, as one of ``users``
        or through a group); None when none, or when the scope does not exist."""
        con = con or self._db.read()
        if not con.execute("SELECT 1 FROM secret_scopes WHERE name = ?", (scope,)).fetchone():
            return None
        if principal.is_admin:
            return "MANAGE"
        # directly, as one of every user, or through a group it is a member of (as in Databricks)
        rows = con.execute("SELECT permission FROM secret_acls WHERE scope = ? AND (principal IN (?, ?) OR principal IN "
                           "(SELECT group_name FROM group_members WHERE member = ?))",
                           (scope, principal.user_name, ALL_USERS, principal.user_name)).fetchall()
        held = [PERMISSIONS.index(row["permission"]) for row in rows]
        return PERMISSIONS[max(held)] if held else None

    def _require(self, principal: Principal, scope: str, needed: str, con=None) -> None:
        have = self.permission(principal, scope, con)
        if have is None:  # the same answer whether the scope is missing or closed to this user
            raise ResourceDoesNotExist(
                f"secret scope {scope!r} does not exist, or user {principal.user_name!r} has no permission on it; "
                f"create it (POST /api/2.0/secrets/scopes/create) or ask a user with MANAGE on it for {needed}")
        if PERMISSIONS.index(have) < PERMISSIONS.index(needed):
            raise PermissionDenied(
                f"user {principal.user_name!r} needs {needed} on secret scope {scope!r} (has {have}); ask a user "
                f"with MANAGE on it to grant it (POST /api/2.0/secrets/acls/put)")

    # -- scopes ------------------------------------------------------------------------------

    def create_scope(self, scope: str, principal: Principal = EMBEDDED, initial_manage_principal: str | None = None) -> None:
        if initial_manage_principal not in (None, ALL_USERS):
            raise InvalidParameterValue(f"initial_manage_principal must be {ALL_USERS!r} (every user) or left out "
                                        f"(the creator), got {initial_manage_principal!r}")
        with self._db.write() as con:
            if con.execute("SELECT 1 FROM secret_scopes WHERE name = ?", (scope,)).fetchone():
                raise ResourceAlreadyExists(f"secret scope {scope!r} already exists")
            con.execute("INSERT INTO secret_scopes VALUES (?, ?)", (scope, int(time.time() * 1000)))
            owner = ALL_USERS if initial_manage_principal == ALL_USERS else principal.user_name
            if owner != EMBEDDED.user_name:
                con.execute("INSERT INTO secret_acls VALUES (?, ?, 'MANAGE')", (scope, owner))

    def list_scopes(self, principal: Principal = EMBEDDED) -> list[dict[str, str]]:
        """The scopes ``principal`` may read (admins: all)."""
        rows = self._db.read().execute("SELECT name FROM secret_scopes ORDER BY name").fetchall()
        return [{"name": row["name"], "backend_type": "DATABRICKS"} for row in rows
                if self.permission(principal, row["name"]) is not None]

    def delete_scope(self, scope: str, principal: Principal = EMBEDDED) -> None:
        with self._db.write() as con:
            self._require(principal, scope, "MANAGE", con)
            con.execute("DELETE FROM secret_scopes WHERE name = ?", (scope,))
            _changed(con)

    # -- secrets -----------------------------------------------------------------------------

    def put(self, scope: str, key: str, value: str, principal: Principal = EMBEDDED) -> None:
        ciphertext = self.key.encrypt(value)
        with self._db.write() as con:
            self._require(principal, scope, "WRITE", con)
            con.execute(
                "INSERT INTO secrets VALUES (?, ?, ?, ?) ON CONFLICT(scope, key) DO UPDATE SET "
                "ciphertext = excluded.ciphertext, last_updated_timestamp = excluded.last_updated_timestamp",
                (scope, key, ciphertext, int(time.time() * 1000)),
            )
            _changed(con)

    def list(self, scope: str, principal: Principal = EMBEDDED) -> list[dict[str, object]]:
        con = self._db.read()
        self._require(principal, scope, "READ", con)
        rows = con.execute(
            "SELECT key, last_updated_timestamp FROM secrets WHERE scope = ? ORDER BY key", (scope,)
        ).fetchall()
        return [{"key": row["key"], "last_updated_timestamp": row["last_updated_timestamp"]} for row in rows]

    def delete(self, scope: str, key: str, principal: Principal = EMBEDDED) -> None:
        with self._db.write() as con:
            self._require(principal, scope, "WRITE", con)
            if con.execute("DELETE FROM secrets WHERE scope = ? AND key = ?", (scope, key)).rowcount == 0:
                raise ResourceDoesNotExist(f"secret {key!r} does not exist in scope {scope!r}")
            _changed(con)

    # -- ACLs --------------------------------------------------------------------------------

    def put_acl(self, scope: str, grantee: str, permission: str, principal: Principal = EMBEDDED) -> None:
        if permission not in PERMISSIONS:
            raise InvalidParameterValue(f"permission {permission!r} is not one of {', '.join(PERMISSIONS)}")
        with self._db.write() as con:
            self._require(principal, scope, "MANAGE", con)
            con.execute("INSERT INTO secret_acls VALUES (?, ?, ?) ON CONFLICT(scope, principal) DO UPDATE SET "
                        "permission = excluded.permission", (scope, grantee, permission))
            _changed(con)

    def delete_acl(self, scope: str, grantee: str, principal: Principal = EMBEDDED) -> None:
        with self._db.write() as con:
            self._require(principal, scope, "MANAGE", con)
            if con.execute("DELETE FROM secret_acls WHERE scope = ? AND principal = ?", (scope, grantee)).rowcount == 0:
                raise ResourceDoesNotExist(f"secret scope {scope!r} has no ACL entry for {grantee!r}")
            _changed(con)

    def get_acl(self, scope: str, grantee: str, principal: Principal = EMBEDDED) -> dict[str, str]:
        con = self._db.read()
        self._require(principal, scope, "MANAGE", con)
        row = con.execute("SELECT permission FROM secret_acls WHERE scope = ? AND principal = ?", (scope, grantee)).fetchone()
        if row is None:
            raise ResourceDoesNotExist(f"secret scope {scope!r} has no ACL entry for {grantee!r}")
        return {"principal": grantee, "permission": row["permission"]}

    def list_acls(self, scope: str, principal: Principal = EMBEDDED) -> list[dict[str, str]]:
        con = self._db.read()
        self._require(principal, scope, "MANAGE", con)
        rows = con.execute("SELECT principal, permission FROM secret_acls WHERE scope = ? ORDER BY principal", (scope,))
        return [{"principal": row["principal"], "permission": row["permission"]} for row in rows]

    # -- references --------------------------------------------------------------------------

    def check_reference(self, reference: str, field: str, principal: Principal = EMBEDDED) -> None:
        """Refuse ``reference`` unless ``principal`` may READ its scope and the key exists.

        Someone who may not read the scope hears the same as for a scope that does not exist.
        """
        scope, key = self._split(reference, field)
        con = self._db.read()
        if self.permission(principal, scope, con) is None:
            raise ResourceDoesNotExist(
                f"{field} refers to {reference}, but secret scope {scope!r} does not exist or user "
                f"{principal.user_name!r} may not READ it; a config may only use secrets its author may read "
                f"(ask a user with MANAGE on the scope: POST /api/2.0/secrets/acls/put)")
        if not con.execute("SELECT 1 FROM secrets WHERE scope = ? AND key = ?", (scope, key)).fetchone():
            raise ResourceDoesNotExist(
                f"{field} refers to {reference}, but scope {scope!r} has no key {key!r}; put it with "
                f"POST /api/2.0/secrets/put")

    def resolve(self, reference: str, field: str = "secret", principal: Principal = EMBEDDED) -> str:
        """The value behind ``{{secrets/scope/key}}``, for a call made on behalf of ``principal``
        (who must still be able to READ the scope) — never for a response."""
        self.check_reference(reference, field, principal)
        scope, key = self._split(reference, field)
        row = self._db.read().execute(
            "SELECT ciphertext FROM secrets WHERE scope = ? AND key = ?", (scope, key)
        ).fetchone()
        return self.key.decrypt(row["ciphertext"], f"secret {reference}")

    @staticmethod
    def _split(reference: str, field: str) -> tuple[str, str]:
        match = SECRET_REFERENCE.match(reference)
        if not match:
            raise InvalidParameterValue(f"{field} is not a secret reference of the form '{{{{secrets/<scope>/<key>}}}}'")
        return match.group(1), match.group(2)
