"""Per-version training history: ``history.json``, a PNG of the curves, and a progress line."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


@dataclass
class HistoryEntry:
    """One global version: central test metrics, aggregated client metrics, seconds.

    ``client_metrics`` are the train replies' metrics, ``client_eval`` the federated evaluation's
    (sync mode with ``strategy.fraction_evaluate > 0``), ``counts`` the replies by outcome,
    ``update_norm`` the server update's L2 norm.

    ``timing`` (train->serve latency, see benchmarks/train_to_serve.py): ``params_at`` (the new
    global parameters exist), ``evaluated_at`` and, when exported, ``published_at`` are wall-clock
    ``time.time()`` stamps; ``export_s``, ``check_s``, ``publish_s`` are the exporter's seconds.
    """

    version: int
    round: int
    test_loss: float
    test_acc: float
    seconds: float
    client_metrics: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    exported_version: int | None = None
    timing: dict[str, float] = field(default_factory=dict)
    client_eval: dict[str, float] | None = None
    update_norm: float | None = None


@dataclass
class History:
    entries: list[HistoryEntry] = field(default_factory=list)
    initial: dict[str, float] = field(default_factory=dict)

    def add(self, entry: HistoryEntry, total: int) -> None:
        self.entries.append(entry)
        log.info(format_progress(entry, total))

    @property
    def best_acc(self) -> float:
        return max((e.test_acc for e in self.entries), default=float("nan"))

    @property
    def final_acc(self) -> float:
        return self.entries[-1].test_acc if self.entries else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {
            "initial": self.initial,
            "rounds": [asdict(e) for e in self.entries],
            "final_test_acc": self.final_acc,
            "best_test_acc": self.best_acc,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> History:
        return cls(
            entries=[HistoryEntry(**e) for e in data.get("rounds", [])],
            initial=dict(data.get("initial", {})),
        )

    def write(self, output_dir: Path, plot: bool = True) -> Path:
        """Write ``history.json`` atomically and, with ``plot``, ``history.png`` next to it."""
        output_dir.mkdir(parents=True, exist_ok=True)
        path = output_dir / "history.json"
        fd, tmp = tempfile.mkstemp(dir=output_dir, prefix=".history-", suffix=".json")
        with os.fdopen(fd, "w") as fh:
            json.dump(self.to_dict(), fh, indent=2)
        os.replace(tmp, path)
        if plot and self.entries:
            plot_history({"run": self}, output_dir / "history.png")
        return path


def format_progress(entry: HistoryEntry, total: int) -> str:
    loss = entry.client_metrics.get("train-loss")
    train = f" | train loss {loss:.4f}" if loss is not None else ""
    return (
        f"version {entry.version:>3}/{total} (round {entry.round}) | "
        f"test acc {entry.test_acc:.4f} | test loss {entry.test_loss:.4f}{train} | "
        f"{entry.seconds:.1f} s"
    )


def plot_history(runs: dict[str, History], path: Path) -> None:
    """Accuracy and loss per version, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 4))
    for label, history in runs.items():
        versions = [e.version for e in history.entries]
        ax_acc.plot(versions, [e.test_acc for e in history.entries], marker="o", label=label)
        ax_loss.plot(versions, [e.test_loss for e in history.entries], marker="o", label=label)
    ax_acc.set(xlabel="global version", ylabel="test accuracy", title="Accuracy")
    ax_loss.set(xlabel="global version", ylabel="test loss", title="Loss")
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
