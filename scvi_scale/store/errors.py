"""The one error type for bad user input (files, layers, counts, columns), printed by the CLI as one line."""

from __future__ import annotations

__all__ = ["InputError"]


class InputError(ValueError):
    """A problem with the user's data or arguments, worded for the user.

    The message is a single line that names the file (or ``<AnnData>`` for an in-memory object), the row,
    gene or column when one is to blame, and says what to do about it. The CLI prints ``error: <message>``
    and exits with status 2; library callers can catch it as a ``ValueError``.
    """

    def __init__(self, message: str) -> None:
        # Keep the promise of one line even when a message embeds text from a third-party exception.
        super().__init__(" ".join(str(message).split()))
