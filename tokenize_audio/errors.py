"""User-facing errors: raised for mistakes a user can fix, printed as one line by the CLIs."""

from __future__ import annotations

import functools
import sys


class SodaError(Exception):
    """A problem with the user's input or settings (not a bug): shown as one line, exit code 2."""


class SkipItem(Exception):
    """One input item (utterance, file, row) cannot be used; it is skipped and listed with this reason."""


def cli_errors(main):
    """Wrap a console-script `main` so SodaError becomes `prog: error: ...` on stderr and exit code 2."""

    @functools.wraps(main)
    def wrapper(argv=None):
        try:
            return main(argv)
        except SodaError as err:
            prog = main.__module__.split(".")[0].replace("_", "-")
            print(f"{getattr(main, 'prog', prog)}: error: {err}", file=sys.stderr)
            raise SystemExit(2) from None
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            raise SystemExit(130) from None

    return wrapper
