"""The engine process: owns the ONNX Runtime sessions, batches requests, runs the models."""
