"""One exception type for every mistake a user can make, so the CLI can print one clear line."""


class SvdzipError(Exception):
    """A user-facing error: the message is printed as is, and the command exits non-zero."""


class InfeasibleBudget(SvdzipError):
    """The budget is below what the allocation can spend at its smallest (one rank per matrix, say)."""
