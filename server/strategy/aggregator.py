"""StreamingAggregator: validate each reply, fold it into one float64 running sum, drop it.

For accepted replies ``i`` with deltas ``d_i``, example counts ``n_i`` and staleness weights
``s_i`` (1 in sync mode)::

    S = Σ_i n_i · s_i · d_i     (float64, one array per model array)
    N = Σ_i n_i
    Δ = S / N                   (the weighted mean delta handed to the server optimizer)

The normaliser is the example count, not ``Σ n_i s_i``: as in FedBuff, the staleness factor damps
a stale buffer in absolute terms (a buffer of replies that are all one version old moves the model
by ``1/√2`` of its mean delta) instead of only re-weighting replies against each other. In sync
mode every ``s_i = 1`` and ``Δ`` is the ``num-examples``-weighted mean, i.e. FedAvg's.

``aggregation="mean"`` keeps only ``S`` and ``N``: memory is O(model) (the float64 sum is twice a
float32 model) however many replies arrive, and each reply's arrays are folded chunk by chunk from
zero-copy views of the message, so no model-sized temporary is made. Summing float32 deltas in
float64 makes the float32 result independent of the arrival order in practice: each w_i·d_i with
integer n_i is exact in float64, and the rounding of a float64 sum (~n·2⁻⁵³ relative) only shows
after the cast to float32 (2⁻²⁴) when a coordinate lies within that distance of a float32 rounding
boundary (about n·2⁻²⁹ of coordinates, i.e. essentially never for models below 10⁷ parameters).

``aggregation="trimmed_mean"`` (coordinate-wise trimmed mean, Yin et al. 2018): for each coordinate
drop the ``t`` largest and ``t`` smallest values of ``s_i · d_i`` and average the rest, unweighted
by ``n_i`` (as flwr's FedTrimmedAvg), with ``t = max(1, ⌊trim_fraction·n⌋)`` for ``n ≥ 3``
replies (at most ``⌊(n-1)/2⌋``; nothing to trim below 3) and the nodes trimmed most logged.
Sorting needs every reply at once, so this mode keeps a copy of each accepted delta:
O(clients × model) memory by necessity.

Before any of that, with ``max_norm_ratio`` set (the default), a reply whose update norm exceeds
``k ×`` the median of the recent norms is rejected (:mod:`.norm_filter`: the math, the warm-up
that holds back the first two replies of a run, and the bound it gives). Rejected replies are
counted by reason and logged with their node id; nothing raises out of :meth:`add`. Client
metrics (e.g. ``train-loss``) are averaged weighted by ``num-examples``.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

import numpy as np
from flwr.app import MetricRecord, RecordDict

from server.strategy.norm_filter import NormFilter
from server.strategy.validation import (
    CHUNK,
    ArraySpec,
    InvalidReply,
    ValidReply,
    specs_of,
    validate_reply,
)

log = logging.getLogger(__name__)

NOT_AVERAGED = frozenset({"num-examples", "version", "partition-id"})


@dataclass(frozen=True)
class _Offer:
    """A valid reply waiting for the norm filter's warm-up (see :mod:`.norm_filter`)."""

    reply: ValidReply
    node_id: int
    staleness_weight: float


class StreamingAggregator:
    """One round's (or one buffer's) running weighted sum of client deltas.

    ``norm_filter`` (the state's, so its window outlives this aggregate) rejects updates whose
    norm is an outlier; None turns that off.
    """

    def __init__(
        self,
        reference: dict[str, np.ndarray],
        *,
        norm_filter: NormFilter | None = None,
        max_update_norm: float | None = None,
        aggregation: str = "mean",
        trim_fraction: float = 0.1,
    ) -> None:
        if aggregation not in ("mean", "trimmed_mean"):
            raise ValueError(f"aggregation must be 'mean' or 'trimmed_mean', got {aggregation!r}")
        if not 0 <= trim_fraction < 0.5:
            raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction}")
        self.specs: dict[str, ArraySpec] = specs_of(reference)
        self.norm_filter = norm_filter
        self.max_update_norm = max_update_norm
        self.aggregation = aggregation
        self.trim_fraction = trim_fraction
        self.rejected: Counter[str] = Counter()
        self._scratch = np.empty(CHUNK, dtype=np.float64)
        self._sum: dict[str, np.ndarray] = {}
        self._kept: list[dict[str, np.ndarray]] = []
        self._kept_nodes: list[int] = []
        self._held: list[_Offer] = []
        self.reset()

    def reset(self) -> None:
        """Start a new sum; rejection counters are reset too, held replies dropped."""
        self._sum = {}
        if self.aggregation == "mean":
            self._sum = {k: np.zeros(s.shape, dtype=np.float64) for k, s in self.specs.items()}
        self._kept = []
        self._kept_nodes = []
        self._held = []
        self.num_accepted = 0
        self.num_examples = 0.0
        self.rejected = Counter()
        self._metric_sums: dict[str, float] = {}
        self._metric_weights: dict[str, float] = {}

    @property
    def num_rejected(self) -> int:
        return sum(self.rejected.values())

    def reject(self, reason: str, node_id: int, detail: str) -> None:
        """Count a reply that failed outside :meth:`add` (e.g. a flwr error reply)."""
        self.rejected[reason] += 1
        log.warning("rejected reply from node %s: %s: %s", node_id, reason, detail)

    def validate(self, content: RecordDict, node_id: int) -> ValidReply | None:
        """Validate without folding; counts and logs a rejection and returns None."""
        try:
            return validate_reply(content, self.specs, self.max_update_norm)
        except InvalidReply as exc:
            self.reject(exc.reason, node_id, exc.detail)
            return None

    def add(self, content: RecordDict, *, node_id: int, staleness_weight: float = 1.0) -> bool:
        """Validate and :meth:`offer` one reply; False when it was rejected."""
        reply = self.validate(content, node_id)
        if reply is None:
            return False
        return self.offer(reply, node_id=node_id, staleness_weight=staleness_weight)

    @property
    def num_held(self) -> int:
        """Valid replies not folded yet: the norm filter's warm-up (at most two, once a run)."""
        return len(self._held)

    def offer(self, reply: ValidReply, *, node_id: int, staleness_weight: float = 1.0) -> bool:
        """Fold a validated reply unless its norm is an outlier; during the norm filter's
        warm-up hold it instead. False when it was rejected."""
        held = _Offer(reply, node_id, float(staleness_weight))
        norm_filter = self.norm_filter
        if norm_filter is None:
            self._fold(held)
            return True
        norm_filter.record(reply.update_norm)
        self._held.append(held)
        if not norm_filter.ready:
            log.debug("holding the reply of node %d until 3 update norms are known", node_id)
            return True
        return all(item is not held for item in self._judge_held())

    def settle(self) -> None:
        """Judge the held replies against the norm filter's median now and fold the others; call
        before reading :attr:`num_accepted` at the end of an aggregate."""
        self._judge_held()

    def _judge_held(self) -> list[_Offer]:
        """Fold or reject every held reply; returns the rejected."""
        held, self._held = self._held, []
        rejected = []
        for item in held:
            norm = item.reply.update_norm
            if self.norm_filter is not None:
                outlier, median = self.norm_filter.is_outlier(norm)
                if outlier:
                    rejected.append(item)
                    self.reject(
                        "norm_outlier",
                        item.node_id,
                        f"update norm {norm:.4g} > max_norm_ratio {self.norm_filter.ratio:g} x "
                        f"the median {median:.4g} of the recent update norms",
                    )
                    continue
            self._fold(item)
        return rejected

    def _fold(self, item: _Offer) -> None:
        """Add a reply with weight ``num-examples · staleness_weight``."""
        reply, staleness_weight = item.reply, item.staleness_weight
        weight = reply.num_examples * staleness_weight
        if self.aggregation == "mean":
            for key, delta in reply.arrays.items():
                self._accumulate(self._sum[key], delta, weight)
        else:
            scale = staleness_weight
            self._kept.append(
                {
                    key: np.array(d, copy=True) if scale == 1.0 else d.astype(np.float64) * scale
                    for key, d in reply.arrays.items()
                }
            )
            self._kept_nodes.append(item.node_id)
        self.num_accepted += 1
        self.num_examples += reply.num_examples
        for key, value in reply.metrics.items():
            if key in NOT_AVERAGED or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            self._metric_sums[key] = self._metric_sums.get(key, 0.0) + reply.num_examples * value
            self._metric_weights[key] = self._metric_weights.get(key, 0.0) + reply.num_examples

    def _accumulate(self, total: np.ndarray, delta: np.ndarray, weight: float) -> None:
        flat_total = total.reshape(-1)
        flat_delta = delta.reshape(-1)
        step = self._scratch.size
        for start in range(0, flat_delta.size, step):
            chunk = flat_delta[start : start + step]
            buf = self._scratch[: chunk.size]
            np.multiply(chunk, weight, out=buf, dtype=np.float64)
            flat_total[start : start + chunk.size] += buf

    def mean_delta(self) -> dict[str, np.ndarray]:
        """``Δ = S / N`` (float64), or the coordinate-wise trimmed mean; needs ≥ 1 accepted."""
        if self.num_accepted == 0:
            raise ValueError("no accepted replies to aggregate")
        if self.aggregation == "mean":
            return {key: total / self.num_examples for key, total in self._sum.items()}
        return self._trimmed_mean()

    def trim_count(self, n: int) -> int:
        """Values dropped at each end of a coordinate: ``max(1, ⌊trim_fraction·n⌋)`` for
        ``n ≥ 3``, at most ``⌊(n-1)/2⌋`` (one value always stays), 0 below 3."""
        if n < 3:
            return 0
        return min(max(1, int(self.trim_fraction * n)), (n - 1) // 2)

    def _trimmed_mean(self) -> dict[str, np.ndarray]:
        """The coordinate-wise trimmed mean; logs how often each node's value was trimmed."""
        n = len(self._kept)
        trim = self.trim_count(n)
        result: dict[str, np.ndarray] = {}
        trimmed = np.zeros(n, dtype=np.int64)  # coordinates where each reply's value was dropped
        coordinates = 0
        for key in self.specs:
            stacked = np.stack([kept[key] for kept in self._kept]).astype(np.float64)
            order = np.argsort(stacked, axis=0, kind="stable")
            ranked = np.take_along_axis(stacked, order, axis=0)
            result[key] = ranked[trim : n - trim].mean(axis=0)
            if trim:
                dropped = np.concatenate([order[:trim], order[n - trim :]]).reshape(-1)
                trimmed += np.bincount(dropped, minlength=n)
            coordinates += stacked[0].size
        if trim:
            share = sorted(
                zip(self._kept_nodes, trimmed / max(coordinates, 1), strict=True),
                key=lambda item: -item[1],
            )
            log.info(
                "trimmed mean of %d replies: dropped the %d lowest and %d highest value(s) of "
                "each coordinate; trimmed most: %s",
                n,
                trim,
                trim,
                ", ".join(f"node {node} in {100 * part:.0f}%" for node, part in share[:3]),
            )
        else:
            log.info("trimmed mean of %d replies: fewer than 3, nothing trimmed", n)
        return result

    def metrics(self) -> MetricRecord:
        """Weighted means of the clients' numeric metrics plus the totals of this aggregate."""
        record = MetricRecord(
            {key: self._metric_sums[key] / self._metric_weights[key] for key in self._metric_sums}
        )
        record["num-examples"] = int(self.num_examples)
        record["num-accepted"] = self.num_accepted
        record["num-rejected"] = self.num_rejected
        return record


def aggregate_metric_records(records: list[MetricRecord]) -> MetricRecord | None:
    """``num-examples``-weighted mean of each numeric metric (weight 1 where it is missing)."""
    if not records:
        return None
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    total = 0.0
    for record in records:
        n = record.get("num-examples", 1)
        n = float(n) if isinstance(n, int | float) and not isinstance(n, bool) and n > 0 else 1.0
        total += n
        for key, value in record.items():
            if key in NOT_AVERAGED or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            sums[key] = sums.get(key, 0.0) + n * value
            weights[key] = weights.get(key, 0.0) + n
    result = MetricRecord({key: sums[key] / weights[key] for key in sums})
    result["num-examples"] = int(total)
    return result
