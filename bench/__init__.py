"""Benchmarks for dyt_kernels: `python -m bench kernels|models|host ...`.

bytecount.py  minimum bytes per op (the denominator of every GB/s)
providers.py  the registry of implementations under test
timing.py     do_bench / CUDA-graph replay / CPU timers
runctl.py     time budget, SIGTERM handling, torch.compile settings
kernels.py    the kernel benchmark driver
models.py     PixArt-alpha and FLUX training and sampling steps
host.py       host time per call of each op (launches stubbed on CPU, real on a GPU)
report.py     environment stamp, JSON, Markdown and charts under bench/results/
gpu_check.sh  the one script a short GPU window runs
wheels/       offline wheels for the GPU machine (liger-kernel)
"""
