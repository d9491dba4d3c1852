"""Close-match suggestions for unknown option values (backend, method, loss, class names)."""

from __future__ import annotations

import difflib
from collections.abc import Sequence

from noop_rt.runtime.errors import UsageError


def suggest(value: str, choices: Sequence[str], what: str) -> UsageError:
    """A one-line usage error for an unknown value, with the closest valid one."""
    close = difflib.get_close_matches(value, list(choices), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return UsageError(f"unknown {what} {value!r}{hint}; choose one of {', '.join(choices)}")


def unexpected_keyword(where: str, name: str, known: Sequence[str]) -> TypeError:
    """Python's own error for an unknown keyword argument, with the closest known one."""
    close = close_match(name, sorted(known))
    return TypeError(f"{where} got an unexpected keyword argument {name!r}"
                     + (f" (did you mean {close!r}?)" if close else ""))


def close_match(name: str, known: Sequence[str], cutoff: float = 0.75) -> str | None:
    """The known name `name` is probably a typo of, or None."""
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=cutoff)
    return close[0] if close else None
