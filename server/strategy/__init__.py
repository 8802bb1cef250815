"""The ParameterServer strategy and its parts (optimizers, aggregation, validation, sampling)."""

from server.strategy.aggregator import StreamingAggregator, aggregate_metric_records
from server.strategy.optimizers import (
    ServerAdagrad,
    ServerAdam,
    ServerOptimizer,
    ServerSGD,
    ServerYogi,
    build_optimizer,
)
from server.strategy.parameter_server import ParameterServer, RoundFailedError, VersionEvent
from server.strategy.sampling import PartitionSampler
from server.strategy.staleness import StalenessPolicy, staleness_weight
from server.strategy.validation import InvalidReply, validate_reply

__all__ = [
    "InvalidReply",
    "ParameterServer",
    "PartitionSampler",
    "RoundFailedError",
    "ServerAdagrad",
    "ServerAdam",
    "ServerOptimizer",
    "ServerSGD",
    "ServerYogi",
    "StalenessPolicy",
    "StreamingAggregator",
    "VersionEvent",
    "aggregate_metric_records",
    "build_optimizer",
    "staleness_weight",
    "validate_reply",
]
