"""Errors that are the user's to fix: the CLI prints them as one line, without a traceback."""

from __future__ import annotations

from typing import Any


class UserInputError(ValueError):
    """A bad value in a config or on the command line.

    The message names the key, the value and what is allowed, so the CLI can print it alone.
    """

    def __init__(self, key: str, value: Any, allowed: str) -> None:
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"{key}={value!r}: {allowed}")


class RunDirectoryError(RuntimeError):
    """The run directory cannot be used as asked (e.g. it already holds a finished run)."""


class EmptyActivationStream(ValueError):
    """The activation stream gave no batch: its corpus has no tokens. The train runner reports it as a
    UserInputError naming the corpora."""

    def __init__(self) -> None:
        super().__init__("the activation stream is empty: the corpus gave no tokens")
