class GKDUserError(Exception):
    """A problem with what the user gave us (a flag, a file, a row, a model path).

    The command-line entry points print its message as one line and exit non-zero, without a
    traceback: the message must say what is wrong, where (flag, file:line) and what is allowed.
    """


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none), for one-line errors."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
