"""The one exception the launcher raises for problems the user can fix."""

from __future__ import annotations


class LauncherError(Exception):
    """A friendly, one-line explanation of why the local stack cannot start or stop."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message
