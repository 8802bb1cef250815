"""The ML task, independent of Flower: typed config, datasets, partitioners, models, training loops
and parameter (de)serialisation. Imports torch, torchvision and numpy only; import each name from
its module (``task.config``, ``task.data``, ...)."""
