"""On a GPU: what runs on CUDA and how fast (``check``), cuDNN's convolution search vs dynamic
batch shapes (``conv_search``); ``session.sh`` runs them and the serving benchmark in one go."""
