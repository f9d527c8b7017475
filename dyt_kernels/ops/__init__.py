"""Triton kernels and their torch.library registrations, one file per op family."""
