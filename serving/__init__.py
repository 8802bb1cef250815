"""fedserve's serving side: the versioned model repository and the onnxruntime serving stack.

Nothing under ``serving/`` imports torch or flwr: a serving node needs onnx, onnxruntime, numpy
and the web stack only.
"""
