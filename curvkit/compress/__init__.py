"""Compression from curvature: sensitivity, mixed-precision quantization, pruning."""
