"""Triton kernels for the LoRA linear (forward and backward) and their launchers."""
