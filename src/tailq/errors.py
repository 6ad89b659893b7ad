"""The one error type for bad input from a user: an argument, an option, a configuration, a data file."""

from __future__ import annotations

__all__ = ["UsageError"]


class UsageError(ValueError):
    """Bad input, named, with the accepted range or the fix; raised before anything starts.

    The CLI reports it as one line and exits with status 2. It is a ``ValueError`` so library callers that
    catch ``ValueError`` keep working.
    """
