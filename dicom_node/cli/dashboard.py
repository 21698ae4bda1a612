"""The QA dashboard's users, for radiology IT: `hash-password` makes the line a user's entry needs.

The configuration keeps only a salted scrypt hash, never a password, so a copied configuration
file does not give anybody a login.
"""

from __future__ import annotations

import getpass
import sys

import typer

from dicom_node.errors import InputRefused

MIN_PASSWORD_CHARS = 10


def _read_password() -> str:
    """Twice from a hidden prompt on a terminal; else the first line of stdin (for scripts)."""
    if not sys.stdin.isatty():
        return sys.stdin.readline().rstrip("\r\n")
    password = getpass.getpass("Password: ")
    if getpass.getpass("Again: ") != password:
        raise InputRefused("the two passwords differ; nothing was hashed")
    return password


def hash_password() -> None:
    """Hash a dashboard password: paste the printed line into [dashboard.users.NAME] with the
    user's role. Reads it twice from a hidden prompt, or once from stdin when that is not a terminal."""
    from dicom_node.qa.auth import hash_password as scrypt_hash

    password = _read_password()
    if len(password) < MIN_PASSWORD_CHARS:
        raise InputRefused(f"a dashboard password needs at least {MIN_PASSWORD_CHARS} characters")
    typer.echo(f'password_hash = "{scrypt_hash(password)}"')
    typer.echo('paste it under [dashboard.users.NAME] with role = "qa" or "admin"', err=True)
