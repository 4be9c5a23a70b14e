"""ONNX: the export beside the Paddle program and the INT8 QDQ graph."""
