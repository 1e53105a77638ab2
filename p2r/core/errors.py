"""The project's one user-error type and its exit code.

``UserError`` is what a user can fix - a flag, a config file, a data file, an image, a
checkpoint URI. The ``p2r`` command (``p2r/cli.py``, and the ``eval`` and ``pipeline`` commands
under it) prints it as one line, ``p2r: error: ...``, and exits ``USER_ERROR_EXIT``. Any other
exception is a bug and keeps its traceback. The validation errors of each layer
(``ImageError``, ``DataError``, ``CheckpointError``, the controller's ``ConfigError``) are
subclasses. It is a ``ValueError`` so that code validating its input can raise it where a
``ValueError`` was raised before, without changing what callers catch.
"""

from __future__ import annotations

USER_ERROR_EXIT = 2
"""Exit code of a user error (click's own usage errors use 2 as well)."""


class UserError(ValueError):
    """An error the user can fix; the command line prints its message as one line and exits 2."""
