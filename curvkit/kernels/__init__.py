"""Fused C++/CUDA kernels from csrc/ with pure-PyTorch references."""
