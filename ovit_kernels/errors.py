"""Exceptions raised by the backend."""

from __future__ import annotations

from collections.abc import Sequence


class OvitError(Exception):
    """Base class of the errors specific to ovit-kernels."""


class BackendUnavailableError(OvitError, RuntimeError):
    """An explicitly requested backend cannot run here; the message says why."""


class NotPositiveDefiniteError(OvitError, ValueError):
    """A Fisher block (or its inverse) is not positive definite, or holds NaN/Inf.

    Attributes:
        blocks: indices of the offending blocks (at most the first 16 are listed).
        name: the layer or tensor the blocks belong to, when known.
    """

    def __init__(self, what: str, blocks: Sequence[int], name: str | None = None, hint: str = ""):
        self.blocks = list(blocks)[:16]
        self.name = name
        where = f" of {name!r}" if name else ""
        more = "" if len(blocks) <= 16 else f" (and {len(blocks) - 16} more)"
        msg = f"{what}{where}: block(s) {self.blocks}{more}"
        if hint:
            msg += f". {hint}"
        super().__init__(msg)
