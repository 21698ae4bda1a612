"""Running a typer app the way every command of this project behaves for a person.

A user error (a usage mistake, or any `NodeError`: refused input, wrong configuration, an
unavailable peer) is one line on stderr and exit code 2; anything unexpected (an internal error)
is one line too, and exit code 1, unless DICOM_NODE_DEBUG is set.
"""

from __future__ import annotations

import json
import math
import os
import sys
from datetime import datetime
from typing import Any

import typer
from typer._click.exceptions import ClickException, NoArgsIsHelpError  # typer vendors click (pinned range)

from dicom_node.errors import NodeError


def make_app(name: str, summary: str) -> typer.Typer:
    """A typer app that behaves like every command of this project: plain help, no tracebacks."""
    return typer.Typer(
        name=name,
        help=summary,
        add_completion=False,
        no_args_is_help=True,
        pretty_exceptions_enable=False,
        rich_markup_mode=None,
    )


def run_app(app: typer.Typer, argv: list[str] | None, *, prog: str, obj: Any = None) -> None:
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
    except NodeError as exc:
        print(f"{label}: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except Exception as exc:
        if os.environ.get("DICOM_NODE_DEBUG"):
            raise
        print(
            f"{label}: internal error: {type(exc).__name__}: {exc} (set DICOM_NODE_DEBUG=1 for details)",
            file=sys.stderr,
        )
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


def parse_size(text: str, minimum: int = 32, maximum: int = 8192) -> tuple[int, int]:
    """'ROWSxCOLS' as two ints within [minimum, maximum]; a usage error (one line, exit 2) otherwise."""
    try:
        rows, cols = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise typer.BadParameter(f"must look like 1024x832, got {text!r}", param_hint="--size") from None
    if not (minimum <= rows <= maximum and minimum <= cols <= maximum):
        raise typer.BadParameter(
            f"must be between {minimum} and {maximum} pixels a side, got {text}", param_hint="--size"
        )
    return rows, cols


def strict_json(obj: Any) -> str:
    """`obj` as strict JSON text (what every JSON the node prints or writes must be): numbers that
    are not finite become null (NaN is not JSON), datetimes ISO 8601, numpy scalars plain numbers."""
    return json.dumps(_finite(obj), indent=2, default=str, allow_nan=False)


def _finite(obj: Any) -> Any:
    if isinstance(obj, datetime):
        return obj.isoformat()
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {key: _finite(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(value) for value in obj]
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        return _finite(obj.item())
    return obj
