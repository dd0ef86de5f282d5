"""Secrets: the Databricks secrets API, encrypted at rest, resolved only when a call is made.

Values are Fernet-encrypted with a key from ``SQLINFER_SECRET_KEY`` or, failing that, a key file
``$SQLINFER_HOME/secret.key`` generated once with mode 0600. Provider configs and
``environment_vars`` hold references (``{{secrets/scope/key}}``); :meth:`SecretStore.resolve`
turns a reference into its value at call time, and nothing else ever returns a value. Errors
name the reference, never the value. ``*_plaintext`` fields of endpoint configs are sealed with
the same key (:meth:`seal`) so the registry never stores a secret in clear.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from serving.control.db import Database
from serving.errors import InvalidParameterValue, ResourceAlreadyExists, ResourceDoesNotExist
from serving.control.wire import SECRET_REFERENCE


def _load_key(home: Path) -> bytes:
    from cryptography.fernet import Fernet

    configured = os.environ.get("SQLINFER_SECRET_KEY")
    if configured:
        return configured.encode()
    path = home / "secret.key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        # O_EXCL: if two processes race, one creates the key and the other reads it.
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "wb") as handle:
                handle.write(Fernet.generate_key())
    for _ in range(50):  # the winner of a race may still be writing
        key = path.read_bytes().strip()
        if key:
            return key
        time.sleep(0.01)
    raise InvalidParameterValue(f"the secret key file {str(path)!r} is empty; delete it to generate a new one")


class SecretStore:
    def __init__(self, db: Database, home: Path):
        from cryptography.fernet import Fernet

        self._db = db
        self._fernet = Fernet(_load_key(home))

    # -- sealing values that live inside endpoint configs -----------------------------------

    def seal(self, value: str) -> str:
        return self._fernet.encrypt(value.encode()).decode()

    def unseal(self, token: str) -> str:
        return self._fernet.decrypt(token.encode()).decode()

    # -- scopes ------------------------------------------------------------------------------

    def create_scope(self, scope: str) -> None:
        with self._db.write() as con:
            if con.execute("SELECT 1 FROM secret_scopes WHERE name = ?", (scope,)).fetchone():
                raise ResourceAlreadyExists(f"secret scope {scope!r} already exists")
            con.execute("INSERT INTO secret_scopes VALUES (?, ?)", (scope, int(time.time() * 1000)))

    def list_scopes(self) -> list[dict[str, str]]:
        rows = self._db.read().execute("SELECT name FROM secret_scopes ORDER BY name").fetchall()
        return [{"name": row["name"], "backend_type": "DATABRICKS"} for row in rows]

    def delete_scope(self, scope: str) -> None:
        with self._db.write() as con:
            if con.execute("DELETE FROM secret_scopes WHERE name = ?", (scope,)).rowcount == 0:
                raise ResourceDoesNotExist(f"secret scope {scope!r} does not exist")

    # -- secrets -----------------------------------------------------------------------------

    def put(self, scope: str, key: str, value: str) -> None:
        ciphertext = self._fernet.encrypt(value.encode())
        with self._db.write() as con:
            self._require_scope(con, scope)
            con.execute(
                "INSERT INTO secrets VALUES (?, ?, ?, ?) ON CONFLICT(scope, key) DO UPDATE SET "
                "ciphertext = excluded.ciphertext, last_updated_timestamp = excluded.last_updated_timestamp",
                (scope, key, ciphertext, int(time.time() * 1000)),
            )

    def list(self, scope: str) -> list[dict[str, object]]:
        con = self._db.read()
        self._require_scope(con, scope)
        rows = con.execute(
            "SELECT key, last_updated_timestamp FROM secrets WHERE scope = ? ORDER BY key", (scope,)
        ).fetchall()
        return [{"key": row["key"], "last_updated_timestamp": row["last_updated_timestamp"]} for row in rows]

    def delete(self, scope: str, key: str) -> None:
        with self._db.write() as con:
            self._require_scope(con, scope)
            if con.execute("DELETE FROM secrets WHERE scope = ? AND key = ?", (scope, key)).rowcount == 0:
                raise ResourceDoesNotExist(f"secret {key!r} does not exist in scope {scope!r}")

    # -- references --------------------------------------------------------------------------

    def check_reference(self, reference: str, field: str) -> None:
        """Raise RESOURCE_DOES_NOT_EXIST naming ``reference`` if its scope or key is missing."""
        scope, key = self._split(reference, field)
        con = self._db.read()
        if not con.execute("SELECT 1 FROM secret_scopes WHERE name = ?", (scope,)).fetchone():
            raise ResourceDoesNotExist(
                f"{field} refers to {reference}, but secret scope {scope!r} does not exist; create it with "
                f"POST /api/2.0/secrets/scopes/create"
            )
        if not con.execute("SELECT 1 FROM secrets WHERE scope = ? AND key = ?", (scope, key)).fetchone():
            raise ResourceDoesNotExist(
                f"{field} refers to {reference}, but scope {scope!r} has no key {key!r}; put it with "
                f"POST /api/2.0/secrets/put"
            )

    def resolve(self, reference: str, field: str = "secret") -> str:
        """The value behind ``{{secrets/scope/key}}`` — only for making a call, never for a response."""
        self.check_reference(reference, field)
        scope, key = self._split(reference, field)
        row = self._db.read().execute(
            "SELECT ciphertext FROM secrets WHERE scope = ? AND key = ?", (scope, key)
        ).fetchone()
        return self._fernet.decrypt(row["ciphertext"]).decode()

    @staticmethod
    def _split(reference: str, field: str) -> tuple[str, str]:
        match = SECRET_REFERENCE.match(reference)
        if not match:
            raise InvalidParameterValue(f"{field} is not a secret reference of the form '{{{{secrets/<scope>/<key>}}}}'")
        return match.group(1), match.group(2)

    @staticmethod
    def _require_scope(con, scope: str) -> None:
        if not con.execute("SELECT 1 FROM secret_scopes WHERE name = ?", (scope,)).fetchone():
            raise ResourceDoesNotExist(f"secret scope {scope!r} does not exist; create it first")
