"""The executor's errors: bad input before launch, and a worker that failed during a run.

``ExecutorError`` is a ``ValueError``; the CLI turns it into one line on stderr
and exit code 2. ``WorkerFailed`` names the rank, the stage and the action that
failed, and keeps the program grid with that action marked in ``grid`` (printed
by ``str(err)`` only when asked for with ``err.details()``).
"""
from __future__ import annotations

from topologies.errors import InputError


class ExecutorError(InputError):
    """A run that cannot start or did not finish; the message says what went wrong and what to do."""


class WorkerFailed(ExecutorError):
    """A worker raised, was killed, or timed out.

    Attributes:
        rank: the worker (process rank) the failure is blamed on.
        stage: the stage of the failing action (None when it failed outside the action loop).
        action: the failing action as text (e.g. ``1B2``), or None.
        index: the action's index in the worker's action list, or None.
        grid: the program grid with the failing action marked ('' when unknown).
    """

    def __init__(self, message: str, rank: int | None = None, stage: int | None = None,
                 action: str | None = None, index: int | None = None, grid: str = "") -> None:
        self.rank, self.stage, self.action, self.index, self.grid = rank, stage, action, index, grid
        super().__init__(message)

    def details(self) -> str:
        """The message followed by the marked program grid."""
        return self.args[0] + ("\n" + self.grid if self.grid else "")
