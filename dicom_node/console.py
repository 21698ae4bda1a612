"""Running a typer app the way every command of this project behaves for a person.

A user error (a usage mistake, or one of the app's own user-error types) is one line on stderr
and exit code 2; anything unexpected is one line too, unless DICOM_NODE_DEBUG is set.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import typer
from typer._click.exceptions import ClickException, NoArgsIsHelpError  # typer vendors click (pinned range)


def run_app(app: typer.Typer, argv: list[str] | None, *, prog: str, user_errors: tuple[type[Exception], ...],
            obj: Any = None) -> None:
    """Run `app` on `argv` and exit with its code; never lets a traceback reach the terminal."""
    label = prog.split()[-1]
    try:
        code = app(args=argv, prog_name=prog, standalone_mode=False, obj=obj)
    except NoArgsIsHelpError as exc:
        typer.echo(exc.ctx.get_help() if exc.ctx else "", err=True)
        sys.exit(2)
    except ClickException as exc:  # usage errors: one line, like every other user error
        print(f"{label}: error: {exc.format_message()}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        sys.exit(130)
    except user_errors as exc:
        print(f"{label}: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except Exception as exc:  # noqa: BLE001 - the last line of defence against tracebacks
        if os.environ.get("DICOM_NODE_DEBUG"):
            raise
        print(f"{label}: internal error: {type(exc).__name__}: {exc} (set DICOM_NODE_DEBUG=1 for details)",
              file=sys.stderr)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


def parse_size(text: str, minimum: int = 32, maximum: int = 8192) -> tuple[int, int]:
    """'ROWSxCOLS' as two ints within [minimum, maximum]; ValueError with a sentence otherwise."""
    try:
        rows, cols = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"--size must look like 1024x832, got {text!r}") from None
    if not (minimum <= rows <= maximum and minimum <= cols <= maximum):
        raise ValueError(f"--size must be between {minimum} and {maximum} pixels a side, got {text}")
    return rows, cols
