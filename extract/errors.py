"""The one error type of the extraction stage."""


class ExtractError(ValueError):
    """Bad input or environment for extraction; the message is one line that names the fix."""


def first_line(error: BaseException) -> str:
    """The first non-empty line of a library exception, for wrapping it in a one-line message."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__
