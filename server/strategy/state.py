"""The parameter server's state and its update: what both loops and the batch hooks drive.

The state holds the global arrays ``x``, the server optimizer and its buffers, the average of the
versions (``strategy.ema_decay``), the seeded train/eval samplers, the staleness policy, the
window of recent update norms (``strategy.max_norm_ratio``, :mod:`.norm_filter`), the counters,
the version and round, and the running sum of the current aggregate. Each client reply
(``delta_i = local_i - received_i``) is validated, judged by its norm and, accepted, folded into
one float64 running sum (:class:`StreamingAggregator`, O(model) memory), and every new global
version is

    x_{v+1} = opt(x_v, g),   g = -Δ,   Δ = Σ n_i s_i delta_i / Σ n_i

with ``n_i`` = num-examples and ``s_i`` = 1 (sync) or FedBuff's ``1/√(1+τ_i)`` (async).
``opt = sgd(lr=1, momentum=0)`` is FedAvg exactly; momentum gives FedAvgM; adam/yogi/adagrad give
FedOpt (Reddi et al. 2021). See :mod:`server.strategy.optimizers`.

:meth:`ServerState.state_dict` is everything needed to resume bit-identically; a checkpoint holds
it as it is plus keys of the app's own (the history, the whole config), which
:meth:`ServerState.load_state_dict` ignores.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message

from server.strategy.aggregator import StreamingAggregator
from server.strategy.averaging import ParameterAverage
from server.strategy.config import StrategyConfig
from server.strategy.messaging import from_array_record, to_array_record
from server.strategy.norm_filter import NormFilter
from server.strategy.optimizers import build_optimizer
from server.strategy.sampling import PartitionSampler
from server.strategy.staleness import StalenessPolicy

#: 3: the window of recent update norms is part of the state (2: the strategy config is stored
#: under "strategy" and the state holds no history)
STATE_FORMAT = 3

#: what the saved state's structure depends on (the app checks the rest of the config before a
#: resume, server/resume.py, where a deliberate change of e.g. mode can be allowed)
RESUME_KEYS = ("optimizer",)


class ServerState:
    """Global arrays, optimizer, samplers, counters, version: fold replies, apply, save, load."""

    def __init__(self, cfg: StrategyConfig, seed: int = 0) -> None:
        self.cfg = cfg
        self.seed = int(seed)
        self.optimizer = build_optimizer(cfg)
        self.sampler = PartitionSampler(self.seed, stream=0)
        self.eval_sampler = PartitionSampler(self.seed, stream=1)
        self.staleness = StalenessPolicy(cfg.max_staleness)
        self.average = ParameterAverage(cfg.ema_decay) if cfg.ema_decay > 0 else None
        ratio = cfg.max_norm_ratio
        self.norm_filter = NormFilter(ratio) if ratio is not None else None
        self.arrays: dict[str, np.ndarray] | None = None
        self.version = 0
        self.round = 0
        self.counters: Counter[str] = Counter()
        self._aggregator: StreamingAggregator | None = None
        self._record: tuple[int, ArrayRecord] | None = None

    # ------------------------------------------------------------ the arrays
    def set_arrays(self, arrays: dict[str, np.ndarray] | ArrayRecord) -> None:
        """Install the global arrays (version 0 for a fresh run)."""
        if isinstance(arrays, ArrayRecord):
            arrays = from_array_record(arrays)
        self.arrays = {key: np.array(value, copy=True) for key, value in arrays.items()}
        self._aggregator = None
        self._record = None

    @property
    def global_arrays(self) -> dict[str, np.ndarray]:
        """The current global arrays (the server's own: do not modify)."""
        if self.arrays is None:
            raise RuntimeError("global arrays are not set; call set_arrays() or start()")
        return self.arrays

    def array_record(self) -> ArrayRecord:
        """The current global arrays as an ArrayRecord (built once per version): what clients
        are sent."""
        arrays = self.global_arrays
        if self._record is None or self._record[0] != self.version:
            self._record = (self.version, to_array_record(arrays))
        return self._record[1]

    def published_arrays(self) -> dict[str, np.ndarray]:
        """What a version publishes (evaluation, export): the global arrays, or their average
        with ``strategy.ema_decay`` (:mod:`server.strategy.averaging`)."""
        arrays = self.global_arrays
        return arrays if self.average is None else self.average.value(arrays)

    def published_record(self) -> ArrayRecord:
        """:meth:`published_arrays` as an ArrayRecord (the clients' record when not averaged)."""
        if self.average is None:
            return self.array_record()
        return to_array_record(self.published_arrays())

    # ------------------------------------------------------------ the update
    @property
    def aggregator(self) -> StreamingAggregator:
        """The running sum of the current aggregate (a round, or an async buffer)."""
        if self._aggregator is None:
            self._aggregator = StreamingAggregator(
                self.global_arrays,
                norm_filter=self.norm_filter,
                max_update_norm=self.cfg.max_update_norm,
                aggregation=self.cfg.aggregation,
                trim_fraction=self.cfg.trim_fraction,
            )
        return self._aggregator

    def fold(self, reply: Message, start_version: int, staleness: int) -> bool:
        """Validate one train reply and offer it to the aggregate with weight
        ``num-examples · s(staleness)`` (``s = 1`` in sync mode); a rejected reply is counted by
        reason. False when it was rejected (True: folded, or held by the norm filter's warm-up
        until :meth:`StreamingAggregator.settle`)."""
        agg = self.aggregator
        node_id = reply.metadata.src_node_id
        if reply.has_error():
            agg.reject("error", node_id, str(reply.error.reason))
            return False
        valid = agg.validate(reply.content, node_id)
        if valid is None:
            return False
        reported = valid.metrics.get("version")
        if reported is not None and int(reported) != start_version:  # type: ignore[call-overload]
            agg.reject(
                "version",
                node_id,
                f"reply says it started from version {reported}, it was sent {start_version}",
            )
            return False
        weight = self.staleness.weight(staleness) if self.cfg.mode == "async" else 1.0
        return agg.offer(valid, node_id=node_id, staleness_weight=weight)

    def apply(self) -> float:
        """``x ← opt(x, -Δ)`` from the aggregate, then ``version += 1``; returns ‖u‖₂.

        The aggregate is left as it is (its metrics and counts describe the new version); the
        caller resets it for the next one.
        """
        mean_delta = self.aggregator.mean_delta()
        self.arrays = self.optimizer.step(self.global_arrays, mean_delta)
        if self.average is not None:
            self.average.update(self.arrays)
        self.version += 1
        self._record = None
        return self.optimizer.last_update_norm

    # ------------------------------------------------------------ save / load
    def state_dict(self) -> dict[str, Any]:
        """The whole state (copies): arrays, optimizer, version, round, RNGs, counters, average."""
        return {
            "format": STATE_FORMAT,
            "arrays": {key: value.copy() for key, value in self.global_arrays.items()},
            "optimizer": self.optimizer.state_dict(),
            "version": self.version,
            "round": self.round,
            "sampler": self.sampler.state_dict(),
            "eval_sampler": self.eval_sampler.state_dict(),
            "counters": dict(self.counters),
            "strategy": asdict(self.cfg),
            "seed": self.seed,
            "average": None if self.average is None else self.average.state_dict(),
            "norm_filter": None if self.norm_filter is None else self.norm_filter.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output (keys of other owners are ignored)."""
        found = state.get("format")
        if found != STATE_FORMAT:
            raise ValueError(
                f"server state format {found!r} is not {STATE_FORMAT}: this checkpoint was written "
                "by another fedserve version; start without resume=true (or from another "
                "output_dir)"
            )
        saved = state["strategy"]
        for key in RESUME_KEYS:
            if saved[key] != getattr(self.cfg, key):
                raise ValueError(
                    f"checkpoint has strategy.{key}={saved[key]!r}, the config says "
                    f"{getattr(self.cfg, key)!r}; resume with the same strategy"
                )
        if self.average is not None and state.get("average") is None:
            raise ValueError(
                "checkpoint has no parameter average but strategy.ema_decay="
                f"{self.cfg.ema_decay}; resume with the run's strategy.ema_decay"
            )
        self.set_arrays(state["arrays"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.version = int(state["version"])
        self.round = int(state["round"])
        self.sampler.load_state_dict(state["sampler"])
        self.eval_sampler.load_state_dict(state["eval_sampler"])
        self.counters = Counter(state["counters"])
        self.seed = int(state["seed"])
        if self.average is not None:
            self.average.load_state_dict(state["average"])
        if self.norm_filter is not None and state.get("norm_filter") is not None:
            self.norm_filter.load_state_dict(state["norm_filter"])
