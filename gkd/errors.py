class GKDUserError(Exception):
    """A problem with what the user gave us (a flag, a file, a row, a model path).

    The command-line entry points print its message as one line and exit non-zero, without a
    traceback: the message must say what is wrong, where (flag, file:line) and what is allowed.
    """
