"""The one exception type the CLI turns into a clean one-line error."""


class OnnxfoldError(Exception):
    """A problem with the user's input: printed as one line, exit code 2, no traceback."""

    def __init__(self, message: str, path=None):
        self.path = str(path) if path is not None else None
        super().__init__(f"{self.path}: {message}" if self.path else message)


class CannotTell(Exception):
    """The graph does not let a rule decide: an unknown shape, a value that is not a constant.

    Raised on purpose by predicates, transforms and the graph helpers they use; the engine
    then leaves the rule unfired and shows the message as the reason. Every other exception
    is a bug and propagates.
    """
