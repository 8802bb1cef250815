"""The app's version sink: every global version is evaluated, exported, recorded, checkpointed.

:class:`ExperimentSink` implements :class:`server.strategy.sink.VersionSink`. For each
:class:`VersionEvent`, on whichever thread the strategy hands it over (the loop's, or the
background worker's with ``strategy.publish_in_background``), in version order:

1. central evaluation of the published arrays on the held-out test set;
2. export to ONNX into the model repository when due (:class:`Publisher`), as the repository
   version the numbering gives the global version (:mod:`server.version_numbering`); it comes
   before the history entry is written because it fills in the entry's ``exported_version`` and
   publish timing, and the train->serve latency it adds to counts from the event's ``made_at``;
3. the run's one :class:`History`: the entry is appended and ``history.json`` rewritten (the PNG
   at most every ``PLOT_EVERY_S``; :meth:`ExperimentSink.close` draws the last one);
4. the checkpoint: the event's state snapshot, the history, the config and the numbering,
   atomically (events without a state, Flower's FedAvg's, are not checkpointed);
5. ``stop_at_accuracy``: :meth:`ExperimentSink.accept` returns True once the test accuracy
   reaches it (that version is still exported and checkpointed).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from server.checkpoint import save_checkpoint
from server.config import ExperimentConfig
from server.history import History, HistoryEntry
from server.publisher import Publisher
from server.strategy.events import VersionEvent
from server.version_numbering import VersionNumbering

log = logging.getLogger(__name__)

PLOT_EVERY_S = 10.0  # matplotlib takes ~0.2 s a version: history.png redraws this often at most

Evaluate = Callable[[dict[str, np.ndarray]], tuple[float, float]]  # arrays -> (loss, accuracy)


class ExperimentSink:
    """Evaluate → export → history → checkpoint for each version; stops at ``stop_at_accuracy``.

    ``history`` is the run's (restored from the checkpoint when resuming); ``checkpoint_path``
    is where each version's checkpoint goes; ``publisher`` is None when nothing is exported;
    ``numbering`` gives the repository version of each global version (None: the next free).
    """

    def __init__(
        self,
        cfg: ExperimentConfig,
        evaluate: Evaluate,
        history: History,
        output_dir: Path,
        checkpoint_path: Path,
        publisher: Publisher | None,
        numbering: VersionNumbering | None = None,
    ) -> None:
        self.cfg = cfg
        self.evaluate = evaluate
        self.history = history
        self.output_dir = output_dir
        self.checkpoint_path = checkpoint_path
        self.publisher = publisher
        self.numbering = numbering
        self.best = max((e.test_acc for e in history.entries), default=-1.0)
        self._last_plot = -math.inf

    def accept(self, event: VersionEvent) -> bool:
        entry = self._evaluate(event)
        is_best = entry.test_acc > self.best
        self.best = max(self.best, entry.test_acc)
        if self.publisher is not None and self.publisher.due(event.version, is_best):
            self._publish(event, entry)
        self._record(entry)
        if event.state is not None:
            checkpoint = {
                **event.state,
                "history": self.history.to_dict(),
                "config": self.cfg.to_dict(),
                "publish": None if self.numbering is None else self.numbering.state_dict(),
            }
            save_checkpoint(self.checkpoint_path, checkpoint)
        target = self.cfg.stop_at_accuracy
        if target is not None and entry.test_acc >= target:
            log.info(
                "version %d reached test acc %.4f >= stop_at_accuracy=%g: stopping",
                event.version,
                entry.test_acc,
                target,
            )
            return True
        return False

    def _publish(self, event: VersionEvent, entry: HistoryEntry) -> None:
        """Export the version as its repository number (when that is above the newest)."""
        assert self.publisher is not None
        if self.numbering is None:
            entry.exported_version = self.publisher.publish(event.arrays, entry)
            return
        number = self.numbering.target(event.version)
        if number is None:
            return
        entry.exported_version = self.publisher.publish(event.arrays, entry, version=number)
        if entry.exported_version is not None:
            self.numbering.published(entry.exported_version)

    def _evaluate(self, event: VersionEvent) -> HistoryEntry:
        """The version's history entry, with its central test loss and accuracy."""
        loss, acc = self.evaluate(event.arrays)
        client_eval = event.client_eval_metrics
        return HistoryEntry(
            version=event.version,
            round=event.round,
            test_loss=loss,
            test_acc=acc,
            seconds=event.seconds,
            client_metrics=dict(event.train_metrics),
            counts=event.counts,
            timing={"params_at": event.made_at, "evaluated_at": time.time()},
            client_eval=None if client_eval is None else dict(client_eval),
            update_norm=event.update_norm,
        )

    def _record(self, entry: HistoryEntry) -> None:
        """Append to the history and rewrite history.json (the PNG every PLOT_EVERY_S at most)."""
        self.history.add(entry, self.cfg.rounds)
        plot = time.perf_counter() - self._last_plot >= PLOT_EVERY_S
        self.history.write(self.output_dir, plot=plot)
        if plot:
            self._last_plot = time.perf_counter()

    def close(self) -> None:
        """The final ``history.json`` and ``history.png``."""
        self.history.write(self.output_dir)
