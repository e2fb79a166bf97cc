"""The one error type of the kernel side: every failure an operator can act on, as one line."""


class LoaderError(RuntimeError):
    """A one-line, operator-facing failure (bad mode, budget, headers, privileges)."""
