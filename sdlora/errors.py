"""`UserError`: what sdlora's own checks raise about what the user gave (a path, a value, a file's contents).

The command line prints a UserError as one line and exits 2; any other exception is unexpected (a bug, or a
library failing in a way sdlora did not foresee): one line with a pointer to `--debug` / `SDLORA_DEBUG=1`, which
show its traceback. UserError is a ValueError, so code and tests that catch ValueError keep working.
"""

from __future__ import annotations


class UserError(ValueError):
    """A problem with the user's input, worded as one line that says what to do."""
