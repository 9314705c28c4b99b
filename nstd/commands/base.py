"""What every command shares: its config, a user's error as one line, escaped output."""
from __future__ import annotations

import argparse
from contextlib import contextmanager
from typing import Iterator

from nstd.config import find_config, load_config
from nstd.errors import NstdError
from nstd.logs import one_line

__all__ = ["UsageError", "as_bad_input", "config_of", "one_line"]

class UsageError(NstdError):
    """A bad combination of arguments."""


@contextmanager
def as_bad_input(*more: type[Exception]) -> Iterator[None]:
    """A plain ValueError (or `more`) from inside is the user's bad input: one line, exit 2."""
    try:
        yield
    except NstdError:
        raise
    except (ValueError, *more) as exc:
        raise UsageError(str(exc)) from None


def config_of(args: argparse.Namespace, required: bool) -> dict:
    """The config this command uses (see find_config); the built-in defaults when none is found
    and none is `required`."""

    return load_config(find_config(args.config, required))
