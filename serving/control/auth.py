"""Who is calling, and what they may do.

Tokens are random bearer strings (``sqli_...``) shown once at creation and stored only as a
SHA-256 hash. Permissions are Databricks' levels on one endpoint, ordered
``CAN_VIEW < CAN_QUERY < CAN_MANAGE``; an endpoint's creator gets CAN_MANAGE, admins may do
everything, and every authenticated user may view and query the system endpoints. A level granted
to a group (``serving.control.principals``) holds for its members while they are members; the
strongest of a principal's direct and group levels counts.

Creating endpoints is an entitlement (``create-serving-endpoints``): admins have it, other users
only when it is granted (``sqlinfer users entitle NAME create-serving-endpoints``), because an
endpoint makes the server call out on its creator's behalf.

The embedded in-process path (DuckDB in your own Python process) uses :data:`EMBEDDED`, an
admin principal that needs no token: the process already owns the database file. The server
never falls back to it: every API request needs ``Authorization: Bearer <token>``.
"""

from __future__ import annotations

import hashlib
import secrets
import time
import uuid
from dataclasses import dataclass

from serving.control.db import Database
from serving.control.generation import GenerationCache
from serving.control.principals import ALL_USERS, GROUP_PREFIX, PrincipalDirectory
from serving.errors import InvalidParameterValue, PermissionDenied, ResourceDoesNotExist, Unauthenticated

LEVELS = ("CAN_VIEW", "CAN_QUERY", "CAN_MANAGE")
CREATE_ENDPOINTS = "create-serving-endpoints"
ENTITLEMENTS = (CREATE_ENDPOINTS,)
# Names a token can never carry: the in-process owner, the system endpoints' creator, and the
# group that stands for every user in ACLs.
RESERVED_USER_NAMES = ("embedded", "system", "users")


@dataclass(frozen=True)
class Principal:
    user_name: str
    is_admin: bool = False
    expires_at_ms: int | None = None  # when the token it came with expires (None: never)


EMBEDDED = Principal("embedded", is_admin=True)


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Auth:
    def __init__(self, db: Database):
        self._db = db
        self.principals = PrincipalDirectory(db)
        # every query asks both: answered from memory until the config generation moves
        self._tokens = GenerationCache(db.path)
        self._levels = GenerationCache(db.path)

    # -- tokens ------------------------------------------------------------------------------

    def create_token(self, user_name: str, is_admin: bool = False, comment: str | None = None,
                     lifetime_seconds: int | None = None) -> tuple[str, str]:
        """A new token for ``user_name``: (token id, token value). The value is not stored."""
        if not user_name or any(c.isspace() for c in user_name) or len(user_name) > 255:
            raise InvalidParameterValue(f"user name {user_name!r} must be 1-255 characters without spaces")
        if user_name.startswith(GROUP_PREFIX):
            raise InvalidParameterValue(f"user name {user_name!r} may not start with {GROUP_PREFIX!r} (it names groups in ACLs)")
        if user_name in RESERVED_USER_NAMES:
            raise InvalidParameterValue(f"user name {user_name!r} is reserved ({', '.join(RESERVED_USER_NAMES)}); choose another")
        if self.principals.exists(user_name):
            raise InvalidParameterValue(f"user name {user_name!r} is a group's name; ACLs name users and groups alike, "
                                        f"so choose another")
        token = "sqli_" + secrets.token_urlsafe(32)
        token_id = uuid.uuid4().hex
        now = int(time.time() * 1000)
        expiry = now + lifetime_seconds * 1000 if lifetime_seconds else None
        with self._db.write() as con:
            con.execute(
                "INSERT INTO tokens (id, token_hash, user_name, is_admin, comment, creation_timestamp, expiry_time) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)", (token_id, _hash(token), user_name, int(is_admin), comment, now, expiry))
        return token_id, token

    def list_tokens(self, user_name: str | None = None) -> list[dict[str, object]]:
        """Every token's metadata (never a value), or only ``user_name``'s."""
        query = "SELECT id, user_name, is_admin, comment, creation_timestamp, expiry_time FROM tokens"
        rows = self._db.read().execute(query + (" WHERE user_name = ?" if user_name else "") + " ORDER BY creation_timestamp",
                                       (user_name,) if user_name else ()).fetchall()
        return [dict(row) | {"is_admin": bool(row["is_admin"])} for row in rows]

    def revoke_token(self, token_id: str, user_name: str | None = None) -> None:
        """Revoke a token; with ``user_name``, only one of that user's own."""
        with self._db.write() as con:
            owner = " AND user_name = ?" if user_name else ""
            if con.execute("DELETE FROM tokens WHERE id = ?" + owner, (token_id, user_name) if user_name else (token_id,)).rowcount == 0:
                raise ResourceDoesNotExist(f"no token with id {token_id!r}" + (f" belongs to {user_name!r}" if user_name else "")
                                           + "; list them with GET /api/2.0/token/list or `sqlinfer tokens list`")

    def authenticate(self, authorization: str | None) -> Principal:
        """``Authorization`` header value -> principal, or 401 UNAUTHENTICATED."""
        if not authorization:
            raise Unauthenticated("missing Authorization header; send 'Authorization: Bearer <token>' "
                                  "(create a token with `sqlinfer tokens create --user NAME`)")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("the Authorization header must be 'Bearer <token>'")
        found = self._tokens.get(_hash(token.strip()), lambda: self._token_principal(_hash(token.strip())))
        if found is None or (found.expires_at_ms is not None and found.expires_at_ms <= time.time() * 1000):
            raise Unauthenticated("invalid, expired or revoked token")
        return found

    def _token_principal(self, token_hash: str) -> Principal | None:
        row = self._db.read().execute(
            "SELECT user_name, is_admin, expiry_time FROM tokens WHERE token_hash = ?", (token_hash,)).fetchone()
        return Principal(row["user_name"], bool(row["is_admin"]), row["expiry_time"]) if row is not None else None

    def principal_named(self, user_name: str) -> Principal:
        """The principal a stored name stands for now (an admin if any of its tokens is one):
        secrets in a config are used with the rights of whoever last changed it."""
        if user_name == EMBEDDED.user_name:
            return EMBEDDED
        row = self._db.read().execute("SELECT max(is_admin) AS admin FROM tokens WHERE user_name = ? AND "
                                      "(expiry_time IS NULL OR expiry_time > ?)",  # an expired admin token is no admin
                                      (user_name, int(time.time() * 1000))).fetchone()
        return Principal(user_name, bool(row["admin"]) if row and row["admin"] is not None else False)

    # -- entitlements ------------------------------------------------------------------------

    def entitle(self, user_name: str, entitlement: str, granted: bool = True) -> None:
        if entitlement not in ENTITLEMENTS:
            raise InvalidParameterValue(f"entitlement {entitlement!r} is not one of {', '.join(ENTITLEMENTS)}")
        with self._db.write() as con:
            if granted:
                con.execute("INSERT OR IGNORE INTO entitlements VALUES (?, ?)", (user_name, entitlement))
            else:
                con.execute("DELETE FROM entitlements WHERE principal = ? AND entitlement = ?", (user_name, entitlement))

    def entitlements(self, user_name: str) -> list[str]:
        rows = self._db.read().execute("SELECT entitlement FROM entitlements WHERE principal = ? ORDER BY entitlement",
                                       (user_name,)).fetchall()
        return [row["entitlement"] for row in rows]

    def require_entitlement(self, principal: Principal, entitlement: str, action: str) -> None:
        if principal.is_admin or entitlement in self.entitlements(principal.user_name):
            return
        raise PermissionDenied(f"user {principal.user_name!r} may not {action}: that needs the {entitlement!r} "
                               f"entitlement; an admin grants it with `sqlinfer users entitle {principal.user_name} {entitlement}`")

    # -- permissions -------------------------------------------------------------------------

    def level(self, principal: Principal, endpoint_id: str) -> str | None:
        """The strongest level ``principal`` holds on the endpoint: directly, or through a group."""
        if principal.is_admin:
            return "CAN_MANAGE"
        return self._levels.get((principal.user_name, endpoint_id), lambda: self._load_level(principal, endpoint_id))

    def _load_level(self, principal: Principal, endpoint_id: str) -> str | None:
        names = [principal.user_name] + [GROUP_PREFIX + g for g in self.principals.groups_of(principal.user_name)]
        rows = self._db.read().execute(
            f"SELECT level FROM permissions WHERE endpoint_id = ? AND principal IN ({', '.join('?' * len(names))})",
            (endpoint_id, *names)).fetchall()
        return max((row["level"] for row in rows), key=LEVELS.index, default=None)

    def require(self, principal: Principal, endpoint_id: str, endpoint_name: str, needed: str) -> None:
        have = self.level(principal, endpoint_id)
        if have is None or LEVELS.index(have) < LEVELS.index(needed):
            raise PermissionDenied(
                f"user {principal.user_name!r} needs {needed} on endpoint {endpoint_name!r} "
                f"(has {have or 'no permission'}); ask someone with CAN_MANAGE to grant it"
            )

    def acl(self, endpoint_id: str) -> list[tuple[str, str]]:
        rows = self._db.read().execute(
            "SELECT principal, level FROM permissions WHERE endpoint_id = ? ORDER BY principal", (endpoint_id,)
        ).fetchall()
        return [(row["principal"], row["level"]) for row in rows]

    def set_acl(self, con, endpoint_id: str, entries: list[tuple[str, str]], replace: bool) -> None:
        """Within the caller's write transaction: replace or update direct permissions."""
        if replace:
            con.execute("DELETE FROM permissions WHERE endpoint_id = ?", (endpoint_id,))
        for principal, level in entries:
            con.execute(
                "INSERT INTO permissions VALUES (?, ?, ?) ON CONFLICT(endpoint_id, principal) DO UPDATE SET level = excluded.level",
                (endpoint_id, principal, level),
            )
