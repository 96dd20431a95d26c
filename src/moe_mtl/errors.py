"""The one error type a user's mistake raises.

`UsageError` means "the command was given something it cannot use": an option value, a file, a task name. Its
message names what was given and what would be valid, on one line. `moe-mtl` prints it as
`moe-mtl <verb>: error: <message>` and exits 2 (docs/errors.md); any other exception keeps its traceback.
It is a ValueError, so library callers that catch ValueError keep working.
"""


class UsageError(ValueError):
    """A bad option value, input file or task name, with a message that says what would be valid."""
