"""Repository version numbers that follow the global version, across restarts.

A run publishes global version ``v`` as repository version ``base + v``. A fresh run takes
``base`` = the newest version the model already has in the repository (0 when it has none, so
the numbers are the global versions themselves); the checkpoint keeps it (key ``"publish"``), and
a resumed run into the same repository and model keeps the same ``base``. A resumed run therefore
never republishes a version under a new number, and never publishes a number below one already
served: a global version whose number is not above the newest published one (it was exported
before the restart, or a later one was) is skipped with one line. A resumed run pointed at
another repository or model name starts a numbering there that is still above everything in it:
``base = max(0, newest - v₀)`` with ``v₀`` the checkpoint's version.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


@dataclass
class VersionNumbering:
    """``base`` of the run; ``newest``: the newest repository version published so far."""

    repository: str
    model_name: str
    base: int
    newest: int

    @classmethod
    def start(
        cls,
        repository: str,
        model_name: str,
        newest: int,
        checkpoint: dict[str, Any] | None,
    ) -> VersionNumbering:
        """The numbering of a run whose model has ``newest`` (0: none) in ``repository``,
        resuming from ``checkpoint`` (None: a fresh run)."""
        saved = (checkpoint or {}).get("publish")
        same_target = (
            isinstance(saved, dict)
            and saved.get("repository") == repository
            and saved.get("model_name") == model_name
        )
        if checkpoint is None:
            base = newest
        elif same_target:
            base = int(saved["base"])  # type: ignore[index]
        else:
            base = max(0, newest - int(checkpoint["version"]))
        return cls(repository, model_name, base, newest)

    def target(self, version: int) -> int | None:
        """The repository version for global ``version``, or None when it would not be above the
        newest published one (logged)."""
        number = self.base + version
        if number <= self.newest:
            log.info(
                "global version %d would be %s version %d, not above the newest (%d, published "
                "before the restart): not published again",
                version,
                self.model_name,
                number,
                self.newest,
            )
            return None
        return number

    def published(self, number: int) -> None:
        self.newest = max(self.newest, number)

    def state_dict(self) -> dict[str, Any]:
        """What the checkpoint keeps (key ``"publish"``)."""
        return {"repository": self.repository, "model_name": self.model_name, "base": self.base}
