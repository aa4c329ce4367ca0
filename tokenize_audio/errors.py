"""User-facing errors: raised for mistakes a user can fix, printed as one line by the CLIs."""

from __future__ import annotations

import errno
import functools
import sys

# Errors of the file system a user can fix (free space, choose a writable --out), reported as one line.
_DISK_ERRORS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.ENOTDIR, errno.EISDIR,
                errno.EFBIG}


class SodaError(Exception):
    """A problem with the user's input or settings (not a bug): shown as one line, exit code 2."""


class SkipItem(Exception):
    """One input item (utterance, file, row) cannot be used; it is skipped and listed with this reason."""


class Stopped(Exception):
    """Work stopped by a signal (pre-emption, Ctrl-C): shown as `prog: message` (what was kept), exit `code`. `prog`
    names the command the user ran when the stop came from inside another one's work (soda-train tokenizing)."""

    def __init__(self, message: str, code: int, prog: str | None = None):
        super().__init__(message)
        self.code, self.prog = code, prog


def one_line(err: BaseException) -> str:
    """The user-facing line of an error; one re-raised from a DataLoader worker carries a traceback."""
    msg = str(err)
    if "Original Traceback" in msg:
        msg = msg.strip().splitlines()[-1].split(": ", 1)[-1]
    return msg


def first_line(err: BaseException, limit: int | None = None, with_type: bool = False) -> str:
    """The first line of an error's message, cut to `limit` characters: how a library's exception (torch, transformers,
    YAML) is quoted inside a one-line SodaError. `with_type` gives `Type: first line` (`Type` alone for an empty
    message), for errors whose type says as much as their text."""
    text = str(err).strip()
    line = text.splitlines()[0][:limit] if text else ""
    if with_type:
        return f"{type(err).__name__}: {line}" if line else type(err).__name__
    return line


def cli_errors(prog: str, interrupted: str = ""):
    """Decorate a console-script `main` so SodaError becomes `prog: error: ...` on stderr, exit code 2.

    `interrupted` is what Ctrl-C should tell the user (e.g. how to resume); the exit code is 130.
    """

    def decorate(main):
        @functools.wraps(main)
        def wrapper(argv=None):
            try:
                return main(argv)
            except SodaError as err:
                print(f"{prog}: error: {one_line(err)}", file=sys.stderr)
                raise SystemExit(2) from None
            except Stopped as err:
                print(f"{err.prog or prog}: {err}", file=sys.stderr)
                raise SystemExit(err.code) from None
            except OSError as err:  # the disk, not the program: full, read-only, no permission, gone
                if err.errno not in _DISK_ERRORS:
                    raise
                where = f"{err.filename}: " if err.filename else ""
                print(f"{prog}: error: {where}{err.strerror or err}", file=sys.stderr)
                raise SystemExit(2) from None
            except KeyboardInterrupt:
                print(f"{prog}: interrupted" + (f"; {interrupted}" if interrupted else ""), file=sys.stderr)
                raise SystemExit(130) from None

        return wrapper

    return decorate
