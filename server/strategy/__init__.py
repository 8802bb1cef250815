"""The ParameterServer strategy and its parts (state, loops, optimizers, aggregation, sinks)."""

from server.strategy.aggregator import StreamingAggregator, aggregate_metric_records
from server.strategy.events import VersionEvent
from server.strategy.optimizers import (
    ServerAdagrad,
    ServerAdam,
    ServerOptimizer,
    ServerSGD,
    ServerYogi,
    build_optimizer,
)
from server.strategy.parameter_server import ParameterServer
from server.strategy.sampling import PartitionSampler
from server.strategy.sink import VersionSink
from server.strategy.staleness import StalenessPolicy, staleness_weight
from server.strategy.state import ServerState
from server.strategy.sync_loop import RoundFailedError
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
    "ServerState",
    "ServerYogi",
    "StalenessPolicy",
    "StreamingAggregator",
    "VersionEvent",
    "VersionSink",
    "aggregate_metric_records",
    "build_optimizer",
    "staleness_weight",
    "validate_reply",
]
