"""Where the student side reads the environment: this module, and only here.

A :class:`~student_client.pool.TeacherPool` (and so a
:class:`~student_client.reader.DistillReader` given ``teachers=`` or
``registry=``) is made with ``trust_env=True`` by default, like httpx's
``trust_env``: settings it was not given explicitly come from these
variables, which is what containers and job launchers set. With
``trust_env=False`` the environment is ignored. Explicit arguments always
win. The variables:

| variable | what it sets | read by |
|---|---|---|
| ``EDISTILL_LOCAL_TRANSPORT`` | ``PoolConfig.local_transport`` (``auto``/``off``) | :func:`pool_config_fields` |
| ``EDISTILL_AUTH_TOKEN``, ``EDISTILL_AUTH_TOKEN_FILE`` | the bearer token sent to teachers | :func:`credential_fields` |
| ``EDISTILL_TLS_CA``, ``EDISTILL_TLS_CERT``, ``EDISTILL_TLS_KEY``, ``EDISTILL_TLS_SERVER_NAME`` | TLS to teachers | :func:`credential_fields` |

The command line reads its own flags' defaults from ``EDISTILL_<FLAG>``
(``teacher_server``'s CLI, which also covers ``--registry`` ->
``EDISTILL_REGISTRY``). The teacher's own credentials use
``EDISTILL_TEACHER_*`` names so they never mix with a student's (SECURITY.md).
"""

from __future__ import annotations

import os
from typing import Any, Mapping

__all__ = ["CREDENTIAL_ENV", "POOL_CONFIG_ENV", "credential_fields", "pool_config_fields"]

#: PoolConfig field -> environment variable.
POOL_CONFIG_ENV = {"local_transport": "EDISTILL_LOCAL_TRANSPORT"}

#: TeacherCredentials field -> environment variable.
CREDENTIAL_ENV = {
    "auth_token": "EDISTILL_AUTH_TOKEN",
    "auth_token_file": "EDISTILL_AUTH_TOKEN_FILE",
    "tls_ca": "EDISTILL_TLS_CA",
    "tls_cert": "EDISTILL_TLS_CERT",
    "tls_key": "EDISTILL_TLS_KEY",
    "tls_server_name": "EDISTILL_TLS_SERVER_NAME",
}


def _read(table: Mapping[str, str], environ: Mapping[str, str] | None) -> dict[str, Any]:
    env = os.environ if environ is None else environ
    return {field: env[var] for field, var in table.items() if env.get(var)}


def pool_config_fields(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The PoolConfig fields the environment sets (empty values count as unset)."""
    return _read(POOL_CONFIG_ENV, environ)


def credential_fields(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The TeacherCredentials fields the environment sets (empty values count as unset)."""
    return _read(CREDENTIAL_ENV, environ)
