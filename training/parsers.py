"""The training command's subcommands and their flags: `train` (the default), `sample` and `eval`.

The program's name comes from the caller (train_mnist.py), so nothing here names the script.
"""
from __future__ import annotations

import argparse

from models import NORMS

from .diffusion import DDPM
from .flags import (GUIDANCE, SAMPLING_STEPS, SEED, Command, Parser, data_source, directory_to_write, existing_file,
                    integer, model_override, number)
from .recipes import MODELS, RECIPES, SAMPLERS
from .runtime import COMPILE_MODES

DEFAULT_GUIDANCE = 4.0
COMMANDS = ("train", "sample", "eval")

DESCRIPTION = """\
Train, sample and evaluate DyT / LayerNorm PixArt-alpha and FLUX diffusion transformers on MNIST (or a
folder of labelled images). Without a command, the flags go to `train`:

    python %(prog)s                                   # DyT PixArt-alpha: `small` on CPU, `seed` on CUDA
    python %(prog)s --model flux --norm layernorm     # its LayerNorm FLUX twin
    torchrun --nproc_per_node 2 %(prog)s ...          # DDP, one process per GPU (gloo on CPU)
    python %(prog)s sample --checkpoint runs/pixart-dyt-small/checkpoint.pt --prompts "2 seven 0"
    python %(prog)s eval --checkpoint runs/pixart-dyt-small/checkpoint.pt

`python %(prog)s COMMAND --help` lists a command's flags. Every flag can also come from
--config file.yaml (keys as the flag names, dashes or underscores); flags on the command line win.
"""


def build_parser(prog: str) -> tuple[Parser, dict[str, Command]]:
    """The top-level parser (named ``prog``) and each command's flags."""
    top = Parser(prog=prog, description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = top.add_subparsers(dest="command", metavar="{train,sample,eval}")
    helps = {"train": "train a model (the default command), then sample and evaluate it",
             "sample": "sample an image grid from a checkpoint",
             "eval": "evaluate a checkpoint: conditional accuracy and feature FID"}
    commands = {name: Command(sub.add_parser(name, help=helps[name], description=helps[name] + ".",
                                             argument_default=argparse.SUPPRESS)) for name in COMMANDS}
    add_train_flags(commands["train"])
    add_sample_flags(commands["sample"])
    add_eval_flags(commands["eval"])
    return top, commands


def add_train_flags(c: Command) -> None:
    a = c.add
    a("--config", help="YAML file of flag values; flags given on the command line win", type=existing_file)
    a("--model", default="pixart", choices=tuple(MODELS), help="PixArt-alpha (DDPM) or FLUX (rectified flow)")
    a("--norm", default="dyt", choices=NORMS, help="Dynamic Tanh or the original LayerNorm")
    a("--preset", default="auto", choices=("auto", *RECIPES),
      help="model size and training recipe: seed (the seed's GPU recipe), small (2-core CPU, ~10 min); "
           "auto picks small on CPU, seed on CUDA")
    a("--steps", type=integer(1), help="training steps (default: the preset's)")
    a("--batch-size", type=integer(1), help="global batch size, split over DDP processes (default: the preset's)")
    a("--lr", type=number(0, above=True), help="AdamW peak learning rate (default: the preset's)")
    a("--warmup-steps", type=integer(0),
      help="linear learning-rate warm-up steps, then constant (default: the preset's)")
    a("--weight-decay", default=0.0, type=number(0),
      help="AdamW weight decay of the weight matrices (norm parameters, DyT's alpha included, and biases: none)")
    a("--ema-decay", type=number(0, 1), help="EMA decay of the weights used for sampling (default: the preset's)")
    a("--loss-weighting", choices=DDPM.LOSS_WEIGHTINGS,
      help="PixArt's per-step weight on the MSE of its prediction (eps or v): simple (DDPM), min_snr, "
           "trunc_snr (default: the preset's)")
    a("--prediction", choices=DDPM.PREDICTIONS,
      help="what PixArt's network predicts: eps (DDPM) or v (Salimans & Ho); default: the preset's")
    a("--snr-gamma", default=5.0, type=number(0, above=True), help="gamma of min_snr / the cap of trunc_snr")
    a("--grad-clip", default=1.0, type=number(0, above=True, inf_means="no clipping"),
      help="gradient-norm clipping threshold")
    a("--cfg-dropout", default=0.2, type=number(0, 1), help="share of training prompts replaced by '' for guidance")
    a("--model-override", type=model_override, action="append", metavar="KEY=VALUE",
      help="change one model preset key, e.g. hidden_size=192 or, for FLUX, qk_norm=rmsnorm, qk_alpha_init=4 "
           "(repeatable; see models.PIXART_PRESETS / FLUX_PRESETS)")
    a("--out", type=directory_to_write, help="output directory (default: runs/<model>-<norm>-<preset>)")
    a("--data", default="mnist", type=data_source,
      help="'mnist', or a folder of images with a labels.txt/.csv ('file,label' lines)")
    a("--labels-file", type=existing_file, help="labels file for --data FOLDER (default: FOLDER/labels.txt|csv|tsv)")
    a("--data-dir", default="data", type=directory_to_write,
      help="where MNIST is downloaded and the eval classifier is cached")
    a("--image-size", default=32, type=integer(1, 4096),
      help="images are resized to this square size: a multiple of the model's patch size (and of 4 when "
           "evaluating: the eval classifier pools twice)")
    a("--resume", type=existing_file, help="checkpoint to continue from (exactly: same data order, RNG and "
                                           "optimizer state; the run's flags unless given again); a "
                                           "signal-stopped run says which")
    a("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto: CUDA when available")
    a("--precision", default="auto", choices=("auto", "bf16", "fp32"), help="autocast dtype; auto: bf16 on CUDA")
    a("--compile", default="off", nargs="?", const="default", choices=COMPILE_MODES,
      help="run the model under torch.compile: default, or reduce-overhead (CUDA graphs, CUDA only); "
           "--compile alone means default")
    a("--sample-every", type=integer(0),
      help="write a sample grid every N steps (default: the preset's; 0: only at the end)")
    a("--checkpoint-every", type=integer(0),
      help="write checkpoint.pt every N steps (default: the preset's; 0: only at the end)")
    a("--seed", default=0, type=SEED, help="seed for initialization, data order, noise and prompts")
    c.parser.add_argument("--eval", nargs=0, action=_EvalMoved, help=argparse.SUPPRESS)
    a("--eval-samples", default=1000, type=_eval_samples,
      help="generated images per guidance setting for conditional accuracy and FID (0: skip evaluation)")
    a("--guidance", default=DEFAULT_GUIDANCE, type=GUIDANCE, help="classifier-free guidance scale for samples")
    a("--sampling-steps", type=SAMPLING_STEPS, help="sampler steps (default: 50 DDIM steps / 50 Euler steps)")
    a("--sampler", choices=SAMPLERS, help="PixArt: ddim (default) or ddpm (ancestral); FLUX: euler")
    a("--time-limit", type=number(0, above=True),
      help="stop training after this many minutes of training time (with a checkpoint)")
    a("--num-threads", type=integer(1), help="CPU threads per process (default: available cores / local processes)")
    a("--no-progress", action="store_true", default=False, help="no tqdm bar (a log line every 10% instead)")


def add_sample_flags(c: Command) -> None:
    a = c.add
    a("--config", help="YAML file of flag values; flags given on the command line win", type=existing_file)
    a("--checkpoint", type=existing_file, required=True, help="checkpoint.pt written by training")
    a("--prompts", help="prompts separated by spaces (or commas), e.g. \"2 seven 0\"; repeated to fill "
                        "--num-samples; \"\" samples without a condition (default: random digits, numeral or word)")
    a("--num-samples", default=64, type=integer(1, 100_000), help="images to generate")
    a("--guidance", default=DEFAULT_GUIDANCE, type=GUIDANCE, help="classifier-free guidance scale (1: none)")
    a("--sampling-steps", default=50, type=SAMPLING_STEPS, help="sampler steps")
    a("--sampler", choices=SAMPLERS, help="PixArt: ddim (default) or ddpm; FLUX: euler")
    a("--out", type=directory_to_write, help="output directory (default: the checkpoint's directory)")
    a("--seed", default=0, type=SEED, help="seed for the noise and random prompts")
    a("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto: CUDA when available")
    a("--num-threads", type=integer(1), help="CPU threads (default: the available cores)")
    a("--weights", default="ema", choices=("ema", "model"), help="EMA weights or the raw trained weights")


def add_eval_flags(c: Command) -> None:
    a = c.add
    a("--config", help="YAML file of flag values; flags given on the command line win", type=existing_file)
    a("--checkpoint", type=existing_file, required=True, help="checkpoint.pt written by training")
    a("--eval-samples", default=1000, type=_eval_samples, help="generated images per guidance setting")
    a("--guidance", default=DEFAULT_GUIDANCE, type=GUIDANCE, help="classifier-free guidance scale of the guided half")
    a("--sampling-steps", default=50, type=SAMPLING_STEPS, help="sampler steps")
    a("--sampler", choices=SAMPLERS, help="default: the one the checkpoint's run used")
    a("--data-dir", default="data", type=directory_to_write,
      help="where MNIST is found (or downloaded) and the eval classifier is cached")
    a("--out", type=directory_to_write, help="where metrics.json goes (default: the checkpoint's directory)")
    a("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto: CUDA when available")
    a("--num-threads", type=integer(1), help="CPU threads (default: the available cores)")


def _eval_samples(text: str) -> int:
    """0 (no evaluation), or at least 2: a Frechet distance needs two samples for a covariance."""
    value = integer(0, 100_000)(text)
    if value == 1:
        raise argparse.ArgumentTypeError("must be 0 (no evaluation) or an integer in [2, 100000], got '1'")
    return value


class _EvalMoved(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"--eval is now a command of its own: {parser.prog.rsplit(' ', 1)[0]} eval --checkpoint PATH")
