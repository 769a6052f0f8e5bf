"""The one exception type the CLI turns into a clean one-line error."""


class OnnxfoldError(Exception):
    """A problem with the user's input: printed as one line, exit code 2, no traceback."""

    def __init__(self, message: str, path=None):
        self.path = str(path) if path is not None else None
        super().__init__(f"{self.path}: {message}" if self.path else message)
