"""fedserve's server side: the Flower ServerApp, the ParameterServer strategy, checkpoints and the
ONNX export into the model repository."""
