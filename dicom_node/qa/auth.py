"""Who may use the dashboard: salted scrypt password hashes and the session cookie's secret.

A password is stored as one self-describing line, ``scrypt$N$r$p$SALT$HASH`` (salt and hash in
URL-safe base64), so the cost can be raised later without breaking the hashes made before. Only
the standard library is used (`hashlib.scrypt`, `hmac.compare_digest`).

Sessions are starlette's signed cookies; the signing secret is made once and kept in
``data_dir/dashboard-secret`` (mode 0600), so a restart of the node does not log everybody out,
and deleting that file does. The cookie also carries the login time: a login older than
``[dashboard] session_minutes`` is refused even though each response renews the cookie.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
from pathlib import Path

from dicom_node.errors import ConfigurationError

SECRET_FILE = "dashboard-secret"
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1  # about 16 MiB and tens of milliseconds per check
_SALT_BYTES, _HASH_BYTES = 16, 32


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int, length: int) -> bytes:
    return hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, maxmem=256 * n * r + 2**20, dklen=length)


def hash_password(password: str) -> str:
    """The line to store for `password`: ``scrypt$N$r$p$SALT$HASH`` with a fresh random salt."""
    salt = secrets.token_bytes(_SALT_BYTES)
    digest = _scrypt(password, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P, _HASH_BYTES)
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${_b64(salt)}${_b64(digest)}"


def verify_password(password: str, stored: str) -> bool:
    """Whether `password` matches a `hash_password` line; a malformed line matches nothing."""
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        expected = _unb64(digest)
        if scheme != "scrypt" or not expected:
            return False
        actual = _scrypt(password, _unb64(salt), int(n), int(r), int(p), len(expected))
    except ValueError:
        return False
    return hmac.compare_digest(actual, expected)


DUMMY_HASH = hash_password(secrets.token_urlsafe(16))
"""Checked for an unknown user name, so a wrong name costs the same time as a wrong password."""


def session_secret(data_dir: Path) -> str:
    """The cookie-signing secret kept in data_dir (made once, readable by the node's user only)."""
    path = data_dir / SECRET_FILE
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        try:
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            secret = path.read_text().strip()
        else:
            secret = secrets.token_urlsafe(32)
            with os.fdopen(descriptor, "w") as stream:
                stream.write(secret + "\n")
    except OSError as exc:
        raise ConfigurationError(f"dashboard: cannot keep its session secret in {path}: {exc.strerror}") from exc
    if len(secret) < 32:  # a file written half by a crash, or by hand
        raise ConfigurationError(f"dashboard: {path} holds no usable secret; delete it to make a new one")
    return secret
