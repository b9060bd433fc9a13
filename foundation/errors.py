"""Errors a user can fix, and how every command line reports them: one line `error: ...` on stderr, status 2.

`train.py` and each `python -m tools.X` run their `main` through `run_command`, so a bad config or override, a
missing run directory or image, a refused checkpoint or export, or a missing optional install reads the same
everywhere, without a traceback. Anything else is a bug and keeps its traceback. Imports nothing of the project:
the library's own error types (ConfigError, DataError, TemplateError, CheckpointError, ExportError) subclass
`UserError`, so a new one is handled by every command line without a list to update.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator


class UserError(ValueError):
    """An input the user can fix; the message alone says what and where (no traceback is shown)."""


class MissingExtra(UserError):
    """An optional part of the project is used without its extra (pyproject.toml) installed."""


USER_ERRORS = (UserError, FileNotFoundError)


def report(err: BaseException) -> int:
    """Print `err` as one line `error: <message>` on stderr; the exit status for it (2)."""
    print("error: " + " ".join(str(err).splitlines()), file=sys.stderr)
    return 2


def run_command(main: Callable[..., object], *args) -> int:
    """`main(*args)` as a command: its exit status (an int it returns, else 0), or `report`'s 2 when it raises
    one of `USER_ERRORS`."""
    try:
        result = main(*args)
    except USER_ERRORS as err:
        return report(err)
    return result if isinstance(result, int) and not isinstance(result, bool) else 0


@contextlib.contextmanager
def needs_extra(extra: str, tool: str, command: bool = False) -> Iterator[None]:
    """Around the imports of an optional extra: a missing module becomes `MissingExtra` naming the install,
    e.g. `with needs_extra("eval", "tools.lmms_eval", command=__name__ == "__main__"): import lmms_eval`.
    With `command` (the module runs as `python -m`, its `main` is not reached) it is reported and exits (2)."""
    try:
        yield
    except ModuleNotFoundError as err:
        missing = MissingExtra(f"{tool} needs the {extra} extra: pip install -e '.[{extra}]' ({err})")
        if command:
            sys.exit(report(missing))
        raise missing from err
