"""The ML task, independent of Flower: typed config, datasets, partitioners, models, training loops
and parameter (de)serialisation. Imports torch, torchvision and numpy only."""

from task.config import ConfigError, ExperimentConfig
from task.data import FederatedData, load_dataset
from task.models import build_model, count_parameters
from task.params import get_arrays, set_arrays
from task.partition import label_skew, partition_indices, split_train_val
from task.training import evaluate, get_device, make_loader, set_seed, train

__all__ = [
    "ConfigError",
    "ExperimentConfig",
    "FederatedData",
    "build_model",
    "count_parameters",
    "evaluate",
    "get_arrays",
    "get_device",
    "label_skew",
    "load_dataset",
    "make_loader",
    "partition_indices",
    "set_arrays",
    "set_seed",
    "split_train_val",
    "train",
]
