"""Tests for train_mnist.py, the command: its subcommands, and every kind of bad input it is given.

Each case of BAD_INPUTS runs the command in-process and must end with exit code 2 and exactly one line
on stderr that names the flag (or file) and what it accepts; docs/bad_inputs.md ("Training and
sampling") lists the same cases with what the user gets.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch

import train_mnist
from tiny_runs import ROOT, digit_folder, digits, run_train  # noqa: F401 (fixtures)
from training.checkpoint import load_checkpoint, save_checkpoint


@dataclass(frozen=True)
class Case:
    id: str
    argv: str          # {data} a digit folder, {ckpt} a trained checkpoint, {tmp} a scratch dir, {config} the YAML
    match: str         # a regex the one stderr line must contain
    yaml: str | None = None

    @property
    def shown(self) -> str:
        return self.argv + (f"  (config: {self.yaml.strip()})" if self.yaml else "")


T = "--data {data} --out {tmp}/out --data-dir {tmp}/cache --eval-samples 0 --steps 1 --batch-size 8 "
BAD_INPUTS = [
    # ---- training flags, checked as they are parsed
    Case("steps-negative", "--steps -5", r"argument --steps: must be an integer >= 1, got '-5'"),
    Case("steps-zero", "--steps 0", r"--steps: must be an integer >= 1"),
    Case("steps-text", "--steps ten", r"--steps: must be an integer >= 1, got 'ten'"),
    Case("batch-zero", "--batch-size 0", r"--batch-size: must be an integer >= 1"),
    Case("lr-nan", "--lr nan", r"--lr: must be a finite number > 0, got 'nan'"),
    Case("lr-zero", "--lr 0", r"--lr: must be a finite number > 0"),
    Case("lr-negative", "--lr -0.001", r"--lr: must be a finite number > 0, got '-0.001'"),
    Case("lr-inf", "--lr inf", r"--lr: must be a finite number > 0"),
    Case("warmup-negative", "--warmup-steps -1", r"--warmup-steps: must be an integer >= 0"),
    Case("weight-decay-negative", "--weight-decay -0.1", r"--weight-decay: must be a finite number >= 0"),
    Case("weight-decay-nan", "--weight-decay nan", r"--weight-decay: must be a finite number >= 0"),
    Case("ema-decay-2", "--ema-decay 2", r"--ema-decay: must be a number in \[0, 1\], got '2'"),
    Case("ema-decay-negative", "--ema-decay -0.5", r"--ema-decay: must be a number in \[0, 1\]"),
    Case("grad-clip-negative", "--grad-clip -1", r"--grad-clip: must be a number > 0 \(inf: no clipping\), got '-1'"),
    Case("grad-clip-zero", "--grad-clip 0", r"--grad-clip: must be a number > 0"),
    Case("grad-clip-nan", "--grad-clip nan", r"--grad-clip: must be a number > 0"),
    Case("cfg-dropout-2", "--cfg-dropout 2", r"--cfg-dropout: must be a number in \[0, 1\]"),
    Case("cfg-dropout-negative", "--cfg-dropout -0.1", r"--cfg-dropout: must be a number in \[0, 1\]"),
    Case("snr-gamma-zero", "--snr-gamma 0", r"--snr-gamma: must be a finite number > 0"),
    Case("model-unknown", "--model dit", r"argument --model: invalid choice: 'dit' \(choose from 'pixart', 'flux'\)"),
    Case("norm-unknown", "--norm rmsnorm", r"--norm: invalid choice: 'rmsnorm'"),
    Case("preset-unknown", "--preset huge", r"--preset: invalid choice: 'huge'"),
    Case("loss-weighting-unknown", "--loss-weighting snr", r"--loss-weighting: invalid choice: 'snr'"),
    Case("prediction-unknown", "--prediction x0", r"--prediction: invalid choice: 'x0'"),
    Case("precision-fp8", "--precision fp8", r"--precision: invalid choice: 'fp8'"),
    Case("device-unknown", "--device tpu", r"--device: invalid choice: 'tpu'"),
    Case("compile-unknown", "--compile max", r"--compile: invalid choice: 'max'"),
    Case("sampling-steps-zero", "--sampling-steps 0", r"--sampling-steps: must be an integer in \[1, 1000\]"),
    Case("sampling-steps-5000", "--sampling-steps 5000", r"--sampling-steps: must be an integer in \[1, 1000\]"),
    Case("guidance-nan", "--guidance nan", r"--guidance: must be a finite number >= 0, got 'nan'"),
    Case("guidance-negative", "--guidance -1", r"--guidance: must be a finite number >= 0"),
    Case("eval-samples-1", "--eval-samples 1", r"--eval-samples: must be 0 \(no evaluation\) or an integer in \[2"),
    Case("eval-samples-negative", "--eval-samples -3", r"--eval-samples: must be an integer in \[0, 100000\]"),
    Case("seed-negative", "--seed -1", r"--seed: must be an integer in \[0, 4294967295\]"),
    Case("seed-too-big", "--seed 4294967296", r"--seed: must be an integer in \[0, 4294967295\]"),
    Case("threads-zero", "--num-threads 0", r"--num-threads: must be an integer >= 1"),
    Case("threads-negative", "--num-threads -1", r"--num-threads: must be an integer >= 1"),
    Case("time-limit-zero", "--time-limit 0", r"--time-limit: must be a finite number > 0"),
    Case("sample-every-negative", "--sample-every -1", r"--sample-every: must be an integer >= 0"),
    Case("checkpoint-every-negative", "--checkpoint-every -1", r"--checkpoint-every: must be an integer >= 0"),
    Case("image-size-zero", "--image-size 0", r"--image-size: must be an integer in \[1, 4096\]"),
    Case("override-no-equals", "--model-override depth", r"--model-override: takes KEY=VALUE"),
    Case("out-is-a-file", "--out {ckpt}", r"--out: '.*checkpoint.pt' is a file, not a directory"),
    Case("data-dir-is-a-file", "--data-dir {ckpt}", r"--data-dir: '.*checkpoint.pt' is a file, not a directory"),
    Case("data-missing", "--data {tmp}/nowhere", r"--data: must be 'mnist' or a folder of images"),
    Case("labels-file-missing", "--labels-file {tmp}/nowhere.txt", r"--labels-file: '.*nowhere.txt' does not exist"),
    Case("resume-missing", "--resume {tmp}/nowhere.pt", r"--resume: '.*nowhere.pt' does not exist"),
    Case("resume-directory", "--resume {tmp}", r"--resume: '.*' is a directory, not a file"),
    Case("eval-flag-moved", "--eval", r"--eval is now a command of its own: train_mnist.py eval --checkpoint"),
    Case("unknown-flag", "--learning-rate 0.1", r"unrecognized arguments: --learning-rate 0.1"),
    # ---- training flags that must fit each other, the data or the model
    Case("compile-cuda-graphs-on-cpu", T + "--device cpu --compile reduce-overhead",
         r"--compile reduce-overhead replays the step as CUDA graphs, which need a CUDA device; this run is on cpu"),
    Case("sampler-for-other-model", T + "--sampler euler", r"--sampler: sampler 'euler' does not fit model 'pixart'"),
    Case("sampler-for-flux", T + "--model flux --sampler ddim", r"sampler 'ddim' does not fit model 'flux'"),
    Case("image-size-4", T + "--image-size 4", r"--image-size 4 must be a multiple of the model's patch size 8 "
                                                r"\(set by the small recipe"),
    Case("image-size-not-multiple-of-4", T + "--image-size 30 --model-override patch_size=5 --eval-samples 20",
         r"--image-size 30 must be a multiple of 4 to evaluate"),
    Case("override-unknown-key", T + "--model-override qk_norm=rmsnorm",
         r"--model-override: unknown pixart key\(s\) \['qk_norm'\]; valid keys:"),
    Case("override-not-a-number", T + "--model-override hidden_size=abc",
         r"--model-override .*hidden_size must be an integer >= 1, got 'abc'"),
    Case("override-depth-zero", T + "--model-override depth=0",
         r"--model-override .*depth must be an integer >= 1, got 0"),
    Case("override-heads", T + "--model-override num_heads=5", r"hidden_size=128 must be divisible by num_heads=5"),
    Case("override-qk-start-nan", T + "--model flux --model-override qk_alpha_init=nan",
         r"--model-override .*qk_alpha_init must be a finite number, got 'nan'"),
    Case("batch-larger-than-data", T.replace("--batch-size 8", "--batch-size 1000"),
         r"--batch-size 1000 is larger than the 30 training images"),
    Case("labels-file-with-mnist", "--labels-file {ckpt}", r"--labels-file goes with --data FOLDER"),
    Case("data-folder-without-labels", T.replace("--data {data}", "--data {tmp}"),
         r"no labels file in '.*': expected labels.txt"),
    Case("resume-damaged", "--resume {tmp}/damaged.pt", r"checkpoint '.*damaged.pt' is damaged"),
    Case("resume-contradicting-flag", "--resume {ckpt} --lr 0.5 --data {data}",
         r"--resume .*: the checkpoint was trained with lr=0.001, but this run asks for lr=0.5"),
    Case("resume-fewer-steps", "--resume {ckpt} --steps 1 --data {data}",
         r"--steps 1 is below the checkpoint's step 2"),
    Case("resume-weights-do-not-fit", "--resume {tmp}/mismatch.pt --data {data} --out {tmp}/out",
         r"'.*mismatch.pt': the model weights do not fit the model its config builds"),
    # ---- --config files: the same checks, naming the file
    Case("config-missing", "--config {tmp}/nowhere.yaml", r"--config: '.*nowhere.yaml' does not exist"),
    Case("config-model-dit", "--config {config}",
         r"--config .*: argument --model: invalid choice: 'dit'", "model: dit"),
    Case("config-precision-fp8", "--config {config}", r"--config .*: argument --precision: invalid choice: 'fp8'",
         "precision: fp8"),
    Case("config-lr-nan", "--config {config}", r"--config .*: argument --lr: must be a finite number > 0", "lr: .nan"),
    Case("config-grad-clip-negative", "--config {config}", r"--config .*: argument --grad-clip: must be a number > 0",
         "grad-clip: -1"),
    Case("config-unknown-key", "--config {config}", r"--config .*: unknown key 'learning_rate'; valid keys:",
         "learning_rate: 0.1"),
    Case("config-not-a-mapping", "--config {config}", r"--config .*: expected a mapping of flag names to values",
         "- lr\n- 0.1"),
    Case("config-bad-yaml", "--config {config}", r"--config .*: not valid YAML", "lr: [0.1"),
    Case("config-switch-not-bool", "--config {config}", r"--config .*: --no-progress is on or off", "no_progress: 3"),
    Case("config-override-value", T + "--config {config}", r"--model-override .*depth must be an integer >= 1, got 0",
         "model_overrides:\n  depth: 0"),
    # ---- sample
    Case("sample-no-checkpoint", "sample", r"--checkpoint is required"),
    Case("sample-checkpoint-missing", "sample --checkpoint {tmp}/nowhere.pt",
         r"--checkpoint: '.*nowhere.pt' does not exist"),
    Case("sample-checkpoint-directory", "sample --checkpoint {tmp}", r"--checkpoint: '.*' is a directory, not a file"),
    Case("sample-num-samples-zero", "sample --checkpoint {ckpt} --num-samples 0",
         r"--num-samples: must be an integer in \[1"),
    Case("sample-guidance-nan", "sample --checkpoint {ckpt} --guidance nan",
         r"--guidance: must be a finite number >= 0"),
    Case("sample-guidance-inf", "sample --checkpoint {ckpt} --guidance inf",
         r"--guidance: must be a finite number >= 0"),
    Case("sample-steps-zero", "sample --checkpoint {ckpt} --sampling-steps 0",
         r"--sampling-steps: must be an integer in"),
    Case("sample-seed-negative", "sample --checkpoint {ckpt} --seed -1", r"--seed: must be an integer in"),
    Case("sample-weights-unknown", "sample --checkpoint {ckpt} --weights best", r"--weights: invalid choice: 'best'"),
    Case("sample-out-is-a-file", "sample --checkpoint {ckpt} --out {ckpt}", r"--out: .* is a file, not a directory"),
    Case("sample-prompt-not-a-digit", "sample --checkpoint {ckpt} --prompts eleven",
         r"--prompts: 'eleven' name\(s\) no label this model was trained on; it knows 0-9"),
    Case("sample-sampler-for-other-model", "sample --checkpoint {ckpt} --sampler euler",
         r"--sampler: sampler 'euler' does not fit model 'pixart'"),
    Case("sample-damaged-checkpoint", "sample --checkpoint {tmp}/damaged.pt", r"'.*damaged.pt' is damaged"),
    Case("sample-truncated-checkpoint", "sample --checkpoint {tmp}/truncated.pt",
         r"'.*truncated.pt' is not readable \(truncated, corrupt"),
    Case("sample-foreign-file", "sample --checkpoint {tmp}/foreign.pt", r"'.*foreign.pt' is not a training checkpoint"),
    Case("sample-checkpoint-without-keys", "sample --checkpoint {tmp}/empty.pt",
         r"'.*empty.pt' lacks \['config', 'run_info', 'step', 'model', 'ema'\]"),
    Case("sample-weights-do-not-fit", "sample --checkpoint {tmp}/mismatch.pt",
         r"'.*mismatch.pt': the ema weights do not fit the model its config builds \(size mismatch for "
         r"x_embedder.weight: .*\); it was written by another version of models/ or its config was edited"),
    Case("sample-nan-weights", "sample --checkpoint {tmp}/nan.pt",
         r"'.*nan.pt': the ema weights hold non-finite values"),
    Case("sample-config-guidance-nan", "sample --checkpoint {ckpt} --config {config}",
         r"--config .*: argument --guidance: must be a finite number", "guidance: .nan"),
    # ---- eval
    Case("eval-no-checkpoint", "eval", r"--checkpoint is required"),
    Case("eval-samples-one", "eval --checkpoint {ckpt} --eval-samples 1", r"--eval-samples: must be 0"),
    Case("eval-sampler-for-other-model", "eval --checkpoint {ckpt} --sampler euler",
         r"--sampler: sampler 'euler' does not fit model 'pixart'"),
    Case("eval-nan-weights", "eval --checkpoint {tmp}/nan.pt", r"the ema weights hold non-finite values"),
    Case("eval-weights-do-not-fit", "eval --checkpoint {tmp}/mismatch.pt",
         r"'.*mismatch.pt': the ema weights do not fit the model its config builds"),
]
if not torch.cuda.is_available():
    BAD_INPUTS.append(Case("device-cuda-without-one", "--device cuda", r"--device cuda: no CUDA device is available"))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, digit_folder):
    """A trained two-step PixArt-alpha checkpoint and broken versions of it."""
    tmp = tmp_path_factory.mktemp("inputs")
    run_train(tmp / "run", "pixart", "dyt", digit_folder, "--steps", "2")
    ckpt = tmp / "run" / "out" / "checkpoint.pt"
    data = bytearray(ckpt.read_bytes())
    (tmp / "truncated.pt").write_bytes(bytes(data[: len(data) // 2]))
    start = data.find(b"data/") + 20_000
    data[start:start + 4096] = bytes(b ^ 0xFF for b in data[start:start + 4096])
    (tmp / "damaged.pt").write_bytes(bytes(data))
    torch.save({"weight": torch.ones(3)}, tmp / "foreign.pt")
    save_checkpoint({}, tmp / "empty.pt")
    state = load_checkpoint(ckpt)
    state["ema"] = {k: v.fill_(float("nan")) if v.is_floating_point() else v for k, v in state["ema"].items()}
    save_checkpoint(state, tmp / "nan.pt")
    state = load_checkpoint(ckpt)  # a config whose model the weights do not fit (models/ changed since, or edited)
    state["config"]["model_overrides"]["hidden_size"] = 48
    state["config"]["model_settings"]["hidden_size"] = 48   # (the settings the model is rebuilt from)
    save_checkpoint(state, tmp / "mismatch.pt")
    return {"data": digit_folder, "ckpt": str(ckpt), "tmp": str(tmp)}


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c.id for c in BAD_INPUTS])
def test_bad_input_is_refused_in_one_line(case, inputs, tmp_path, capsys):
    config = tmp_path / "config.yaml"
    if case.yaml is not None:
        config.write_text(case.yaml + "\n")
    argv = case.argv.format(**inputs, config=config).split()
    with pytest.raises(SystemExit) as end:
        train_mnist.main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if not line.startswith("[")]  # "[data] ..." notices may precede
    assert end.value.code == 2, err
    assert len(lines) == 1 and re.match(r"train_mnist.py (train|sample|eval): error: ", lines[0]), err
    assert re.search(case.match, lines[0]), lines[0]


def test_the_bad_input_table_lists_every_case():
    doc = open(os.path.join(ROOT, "docs", "bad_inputs.md"), encoding="utf-8").read()
    missing = [c.id for c in BAD_INPUTS if f"test_bad_input_is_refused_in_one_line[{c.id}]" not in doc]
    assert not missing, f"docs/bad_inputs.md lacks rows for {missing}"


def test_a_bad_flag_in_a_real_process_is_one_line_and_exit_2():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train_mnist.py"), "--grad-clip", "-1"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["train_mnist.py train: error: argument --grad-clip: must be a number "
                                                "> 0 (inf: no clipping), got '-1' (see train_mnist.py train --help)"]


@pytest.mark.parametrize("argv, shows", [
    (["--help"], "{train,sample,eval}"),
    (["train", "--help"], "--grad-clip GRAD_CLIP"),
    (["sample", "--help"], "--prompts PROMPTS"),
    (["eval", "--help"], "--eval-samples EVAL_SAMPLES"),
])
def test_help_of_each_command(argv, shows, capsys):
    with pytest.raises(SystemExit) as end:
        train_mnist.main(argv)
    assert end.value.code == 0 and shows in capsys.readouterr().out


def test_plain_flags_train_and_the_train_command_is_the_same(tmp_path, digit_folder):
    """`python train_mnist.py [flags]` (README's command) is `python train_mnist.py train [flags]`."""
    common = ["--data", digit_folder, "--batch-size", "8", "--steps", "1", "--eval-samples", "0", "--no-progress",
              "--sampling-steps", "2", "--model-override", "hidden_size=32", "--model-override", "num_heads=2"]
    plain = train_mnist.run_command([*common, "--out", str(tmp_path / "a"), "--data-dir", str(tmp_path)])
    named = train_mnist.run_command(["train", *common, "--out", str(tmp_path / "b"), "--data-dir", str(tmp_path)])
    assert plain["final_loss_mean_last_100"] == named["final_loss_mean_last_100"]
