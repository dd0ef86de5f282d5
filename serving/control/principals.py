"""Groups and service principals: the principals besides users that permissions and rate limits name.

Users exist through their tokens (``sqlinfer tokens create --user NAME``) and are named by that
name. A **group** is a named set of users and service principals that an admin manages; endpoint
permissions and secret ACLs may be granted to it, and ``ai_gateway`` rate limits with key
``user_group`` are shared by its members. The group ``users`` stands for every principal and is
never stored. A **service principal** is an application's identity: an admin creates it (it gets
a random ``application_id``) and mints tokens for it (``POST /api/2.0/token-management/
on-behalf-of/tokens``); a request with such a token runs as ``application_id``, which is what
permissions (``service_principal_name``) and rate limits (``key: service_principal``) name, as in
Databricks.

The REST shapes are Databricks' SCIM ones (``/api/2.0/preview/scim/v2/Groups`` and
``/ServicePrincipals``); a group member's ``value`` is the user name or application id (sqlinfer
has no separate user ids).
"""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass

from serving.control.db import Database
from serving.errors import InvalidParameterValue, ResourceAlreadyExists, ResourceDoesNotExist

ALL_USERS = "users"  # every principal belongs to it; never stored
GROUP_NAME = re.compile(r"^[A-Za-z0-9_.@+-][A-Za-z0-9 _.@+-]{0,127}$")
GROUP_PREFIX = "group:"  # how endpoint ACL rows tell a group from a user


@dataclass(frozen=True)
class Group:
    id: str
    name: str
    members: tuple[str, ...]


@dataclass(frozen=True)
class ServicePrincipal:
    id: str
    application_id: str
    display_name: str
    active: bool


class PrincipalDirectory:
    """Groups, their members and service principals, in the registry's database."""

    def __init__(self, db: Database):
        self._db = db

    # -- membership (read on every permission check and rate-limited call) -------------------

    def groups_of(self, member: str) -> tuple[str, ...]:
        """The groups ``member`` belongs to, ``users`` included."""
        rows = self._db.read().execute("SELECT group_name FROM group_members WHERE member = ? ORDER BY group_name",
                                       (member,)).fetchall()
        return (ALL_USERS,) + tuple(row["group_name"] for row in rows)

    # -- groups ------------------------------------------------------------------------------

    def create_group(self, name: str, members: list[str] | None = None) -> Group:
        if not isinstance(name, str) or not GROUP_NAME.match(name) or name == ALL_USERS:
            raise InvalidParameterValue(f"displayName {name!r}: a group name is 1-128 letters, digits, spaces or "
                                        f"'_.@+-' and not {ALL_USERS!r} (every user's group)")
        group_id = uuid.uuid4().hex[:16]
        with self._db.write() as con:
            if con.execute("SELECT 1 FROM tokens WHERE user_name = ? LIMIT 1", (name,)).fetchone():
                # secret ACLs name users and groups alike: one name must not stand for both
                raise ResourceAlreadyExists(f"displayName {name!r} is a user's name; give the group another name")
            if con.execute("SELECT 1 FROM groups WHERE name = ?", (name,)).fetchone():
                raise ResourceAlreadyExists(f"group {name!r} already exists; add members with PATCH "
                                            f"/api/2.0/preview/scim/v2/Groups/<id> or `sqlinfer groups add {name} USER`")
            con.execute("INSERT INTO groups VALUES (?, ?, ?)", (name, group_id, int(time.time() * 1000)))
            for member in members or []:
                con.execute("INSERT OR IGNORE INTO group_members VALUES (?, ?)", (name, _member(member)))
        return self.group(group_id)

    def groups(self) -> list[Group]:
        return [self._group(row) for row in self._db.read().execute("SELECT * FROM groups ORDER BY name").fetchall()]

    def group(self, group_id: str) -> Group:
        row = self._db.read().execute("SELECT * FROM groups WHERE id = ?", (group_id,)).fetchone()
        if row is None:
            raise ResourceDoesNotExist(f"no group has id {group_id!r}; list them with GET /api/2.0/preview/scim/v2/Groups")
        return self._group(row)

    def group_named(self, name: str) -> Group:
        row = self._db.read().execute("SELECT * FROM groups WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise ResourceDoesNotExist(f"group {name!r} does not exist; create it with `sqlinfer groups create {name}` "
                                       f"or POST /api/2.0/preview/scim/v2/Groups")
        return self._group(row)

    def exists(self, name: str) -> bool:
        return name == ALL_USERS or self._db.read().execute("SELECT 1 FROM groups WHERE name = ?", (name,)).fetchone() is not None

    def change_members(self, name: str, add: list[str] = (), remove: list[str] = ()) -> Group:
        group = self.group_named(name)
        with self._db.write() as con:
            for member in add:
                con.execute("INSERT OR IGNORE INTO group_members VALUES (?, ?)", (name, _member(member)))
            for member in remove:
                con.execute("DELETE FROM group_members WHERE group_name = ? AND member = ?", (name, member))
            _membership_changed(con)
        return self.group(group.id)

    def delete_group(self, group_id: str) -> None:
        group = self.group(group_id)
        with self._db.write() as con:
            con.execute("DELETE FROM group_members WHERE group_name = ?", (group.name,))
            con.execute("DELETE FROM groups WHERE id = ?", (group_id,))
            con.execute("DELETE FROM permissions WHERE principal = ?", (GROUP_PREFIX + group.name,))
            con.execute("DELETE FROM secret_acls WHERE principal = ?", (group.name,))  # a later namesake gets nothing
            _membership_changed(con)

    def _group(self, row) -> Group:
        members = self._db.read().execute("SELECT member FROM group_members WHERE group_name = ? ORDER BY member",
                                          (row["name"],)).fetchall()
        return Group(row["id"], row["name"], tuple(m["member"] for m in members))

    # -- service principals ------------------------------------------------------------------

    def create_service_principal(self, display_name: str) -> ServicePrincipal:
        if not isinstance(display_name, str) or not display_name.strip() or len(display_name) > 255:
            raise InvalidParameterValue(f"displayName {display_name!r}: give the application's name, 1-255 characters")
        sp_id, application_id = uuid.uuid4().hex[:16], str(uuid.uuid4())
        with self._db.write() as con:
            con.execute("INSERT INTO service_principals VALUES (?, ?, ?, 1, ?)",
                        (application_id, sp_id, display_name, int(time.time() * 1000)))
        return self.service_principal(sp_id)

    def service_principals(self) -> list[ServicePrincipal]:
        rows = self._db.read().execute("SELECT * FROM service_principals ORDER BY display_name").fetchall()
        return [_service_principal(row) for row in rows]

    def service_principal(self, sp_id: str) -> ServicePrincipal:
        row = self._db.read().execute("SELECT * FROM service_principals WHERE id = ?", (sp_id,)).fetchone()
        if row is None:
            raise ResourceDoesNotExist(f"no service principal has id {sp_id!r}; list them with "
                                       f"GET /api/2.0/preview/scim/v2/ServicePrincipals")
        return _service_principal(row)

    def service_principal_by_application(self, application_id: str) -> ServicePrincipal:
        row = self._db.read().execute("SELECT * FROM service_principals WHERE application_id = ?",
                                      (application_id,)).fetchone()
        if row is None:
            raise ResourceDoesNotExist(f"no service principal has application_id {application_id!r}; create one with "
                                       f"POST /api/2.0/preview/scim/v2/ServicePrincipals")
        return _service_principal(row)

    def is_service_principal(self, name: str) -> bool:
        return self._db.read().execute("SELECT 1 FROM service_principals WHERE application_id = ?",
                                       (name,)).fetchone() is not None

    def delete_service_principal(self, sp_id: str) -> None:
        found = self.service_principal(sp_id)
        with self._db.write() as con:  # its tokens stop working with it
            con.execute("DELETE FROM tokens WHERE user_name = ?", (found.application_id,))
            con.execute("DELETE FROM group_members WHERE member = ?", (found.application_id,))
            con.execute("DELETE FROM permissions WHERE principal = ?", (found.application_id,))
            con.execute("DELETE FROM secret_acls WHERE principal = ?", (found.application_id,))
            con.execute("DELETE FROM entitlements WHERE principal = ?", (found.application_id,))
            con.execute("DELETE FROM service_principals WHERE id = ?", (sp_id,))


def _membership_changed(con) -> None:
    """A group can grant READ on a secret scope: backends holding resolved keys are rebuilt (and
    so re-checked) after any membership change, as after a secret ACL change."""
    con.execute("UPDATE secret_generation SET generation = generation + 1 WHERE id = 1")


def _member(value: object) -> str:
    if not isinstance(value, str) or not value or len(value) > 255 or any(c.isspace() for c in value):
        raise InvalidParameterValue(f"member {value!r}: a member is a user name or a service principal's "
                                    f"application_id, 1-255 characters without spaces")
    return value


def _service_principal(row) -> ServicePrincipal:
    return ServicePrincipal(row["id"], row["application_id"], row["display_name"], bool(row["active"]))
