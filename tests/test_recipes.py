"""The training recipes (issue 13): loss types, timestep weights and timestep sampling checked against values worked
out by hand here, zero terminal SNR end to end (train, save, load, sample), and the flags' errors."""

import importlib.util
import json
import math
import os
import shutil

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from helpers import load_state_dict, max_abs_diff
from test_train_text_to_image import SCRIPT, base_args

import textual_inversion
import train_text_to_image
from devkit.command_line import command_line

T = 1000


def scaled_linear_alphas_cumprod():
    """SD's schedule by hand: betas evenly spaced in sqrt between 0.00085 and 0.012."""
    betas = np.linspace(math.sqrt(0.00085), math.sqrt(0.012), T, dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas)


def zero_unet(noisy_latents, timesteps, encoder_hidden_states, added_cond_kwargs=None, return_dict=False):
    """A UNet that predicts 0, so the error is minus the target and every per-sample loss is known in closed form."""
    return (torch.zeros_like(noisy_latents),)


def loss_at(timestep, prediction_type="epsilon", **fields):
    """diffusion_loss with every draw pinned to `timestep` (a 'range' bias of weight 1e12 on that one timestep), the
    zero UNet, and the noise it drew (replayed from the same seed)."""
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=T)
    pin = dict(
        timestep_bias_strategy="range",
        timestep_bias_multiplier=1e12,
        timestep_bias_begin=timestep,
        timestep_bias_end=timestep + 1,
    )
    config = train_text_to_image.LossConfig(prediction_type=prediction_type, **pin, **fields)
    latents = torch.from_numpy(np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32))
    loss = train_text_to_image.diffusion_loss(
        zero_unet, scheduler, latents, None, torch.Generator().manual_seed(3), config
    )
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(3), dtype=latents.dtype)
    return loss.item(), latents.double().numpy(), noise.double().numpy()


@pytest.mark.parametrize("timestep", [0, 13, 500, 999])
def test_losses_and_weights_equal_hand_computed_values(timestep):
    alpha_bar = scaled_linear_alphas_cumprod()[timestep]
    snr = alpha_bar / (1 - alpha_bar)
    sigma = math.sqrt((1 - alpha_bar) / alpha_bar)
    _, latents, noise = loss_at(timestep)
    velocity = math.sqrt(alpha_bar) * noise - math.sqrt(1 - alpha_bar) * latents
    for target, prediction_type, v_factor in [(noise, "epsilon", 1.0), (velocity, "v_prediction", snr / (snr + 1))]:
        error = np.abs(target)  # the zero UNet's error
        min_snr = min(snr, 5.0) / snr * v_factor
        debiased = 1 / math.sqrt(min(max(snr, 1e-3), 1e3)) * v_factor
        huber_c = {"constant": 0.1, "exponential": 0.1 ** (timestep / T), "snr": (1 - 0.1) / (1 + sigma) ** 2 + 0.1}
        expected = {
            (("loss_type", "l2"),): (error**2).mean(),
            (("loss_type", "l1"),): error.mean(),
            (("loss_type", "l2"), ("snr_gamma", 5.0)): min_snr * (error**2).mean(),
            (("loss_type", "l2"), ("debiased_estimation", True)): debiased * (error**2).mean(),
            (("loss_type", "l1"), ("snr_gamma", 5.0), ("debiased_estimation", True)): min_snr * debiased * error.mean(),
        }
        for schedule, c in huber_c.items():
            pseudo_huber = np.sqrt(error**2 + c**2) - c
            expected[(("loss_type", "huber"), ("huber_schedule", schedule))] = (2 * c * pseudo_huber).mean()
            expected[(("loss_type", "smooth_l1"), ("huber_schedule", schedule))] = (2 * pseudo_huber).mean()
        for fields, value in expected.items():
            got, _, _ = loss_at(timestep, prediction_type, **dict(fields))
            # 1e-4: the script computes 1 - alpha_bar in float32, which loses digits near t = 0.
            assert got == pytest.approx(value, rel=1e-4), (timestep, prediction_type, fields)


def drawn_timesteps(count=4000, **fields):
    """The timesteps diffusion_loss draws for a batch of `count` (read back from the scheduler's add_noise)."""
    scheduler = DDPMScheduler(num_train_timesteps=T)
    seen = []
    add_noise = scheduler.add_noise
    scheduler.add_noise = lambda latents, noise, timesteps: (
        seen.append(timesteps) or add_noise(latents, noise, timesteps)
    )
    config = train_text_to_image.LossConfig(prediction_type="epsilon", **fields)
    latents = torch.zeros(count, 1, 1, 1)
    train_text_to_image.diffusion_loss(zero_unet, scheduler, latents, None, torch.Generator().manual_seed(0), config)
    return seen[0].numpy()


def test_timestep_sampling_draws_the_chosen_distribution():
    uniform = drawn_timesteps()
    assert 0.2 < np.mean(uniform < 250) < 0.3
    # earlier x 4 on a quarter of the timesteps: 4 * 0.25 / (4 * 0.25 + 0.75) = 57% of the draws.
    earlier = drawn_timesteps(timestep_bias_strategy="earlier", timestep_bias_multiplier=4.0)
    assert 0.54 < np.mean(earlier < 250) < 0.60
    later = drawn_timesteps(timestep_bias_strategy="later", timestep_bias_multiplier=4.0, timestep_bias_portion=0.1)
    assert 0.28 < np.mean(later >= 900) < 0.33  # 0.4 / 1.3 = 31%
    in_range = drawn_timesteps(
        timestep_bias_strategy="range", timestep_bias_multiplier=9.0, timestep_bias_begin=400, timestep_bias_end=500
    )
    assert 0.47 < np.mean((in_range >= 400) & (in_range < 500)) < 0.53  # 0.9 / 1.8 = 50%
    # Logit-normal: the median is T * sigmoid(mean); a wider std moves draws to the ends.
    logit = drawn_timesteps(timestep_sampling="logit_normal", logit_mean=1.0, logit_std=1.0)
    assert abs(np.median(logit) - T / (1 + math.exp(-1.0))) < 15
    assert logit.min() >= 0 and logit.max() <= T - 1
    # Outside [100, 900): P(|n| > logit(0.9) / 3) = 46% with std 3; 12% with mean 1, std 1.
    wide = drawn_timesteps(timestep_sampling="logit_normal", logit_std=3.0)
    assert 0.43 < np.mean((wide < 100) | (wide >= 900)) < 0.50
    assert 0.09 < np.mean((logit < 100) | (logit >= 900)) < 0.15
    # The same generator state draws the same timesteps: resume stays exact.
    assert np.array_equal(logit, drawn_timesteps(timestep_sampling="logit_normal", logit_mean=1.0, logit_std=1.0))


# What each PyTorch script needs on its command line besides the flags under test.
REQUIRED = {
    train_text_to_image: "--pretrained_model_name_or_path p --train_data_dir d",
    textual_inversion: "--pretrained_model_name_or_path p --train_data_dir d --placeholder_token t"
    " --initializer_token a",
}


def assert_both_scripts_refuse(flags, message, capsys):
    """Both PyTorch scripts stop at argument parsing (exit code 2) with `message`."""
    for script, required in REQUIRED.items():
        with pytest.raises(SystemExit) as exit_info:
            script.parse_args(command_line(required, flags))
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err


BAD_FLAGS = {
    "huber_c zero": ("--loss_type huber --huber_c 0", "--huber_c must be in (0, 1]"),
    "huber_c above 1 scheduled": ("--loss_type huber --huber_c 2", "--huber_c must be in (0, 1]"),
    "logit std": ("--timestep_sampling logit_normal --logit_std 0", "--logit_std must be positive"),
    "bias multiplier": ("--timestep_bias_strategy later --timestep_bias_multiplier 0", "must be positive"),
    "bias portion": ("--timestep_bias_strategy later --timestep_bias_portion 1.5", "must be in (0, 1)"),
    "bias range": ("--timestep_bias_strategy range --timestep_bias_begin 500 --timestep_bias_end 100", "begin < end"),
    "two samplers": ("--timestep_sampling logit_normal --timestep_bias_strategy later", "pick one"),
    "loss type": ("--loss_type l3", "invalid choice: 'l3'"),
}


@pytest.mark.parametrize("case", sorted(BAD_FLAGS))
def test_bad_recipe_flags_are_clear_errors(case, capsys):
    flags, message = BAD_FLAGS[case]
    assert_both_scripts_refuse(flags, message, capsys)


def test_zero_terminal_snr_trains_saves_and_samples_from_pure_noise(launch, assets, tmp_path):
    """v-prediction on the rescaled schedule with Min-SNR, debiased estimation and the SNR-scheduled Huber loss:
    finite losses, a saved scheduler that samples from the last timestep on the rescaled schedule, and resume exact
    with the recipes on."""
    full, resumed = str(tmp_path / "full"), str(tmp_path / "resumed")
    recipe = (
        "--rescale_betas_zero_snr --prediction_type v_prediction --snr_gamma 5 --debiased_estimation_loss"
        " --loss_type huber --timestep_bias_strategy later --timestep_bias_multiplier 3 --max_train_steps 4"
        " --checkpointing_steps 2 --random_flip --logging_steps 1"
    )
    result = launch.accelerate(SCRIPT, base_args(assets, full, recipe))
    losses = [float(line.split("loss=")[1].split(",")[0]) for line in result.output.splitlines() if " loss=" in line]
    assert len(losses) >= 4 and all(math.isfinite(loss) and loss > 0 for loss in losses)

    config = json.load(open(os.path.join(full, "scheduler", "scheduler_config.json")))
    # The tiny pipeline's PNDM scheduler cannot rescale, so the saved one is DDIM (the paper's sampler).
    assert config["_class_name"] == "DDIMScheduler"
    assert config["rescale_betas_zero_snr"] is True and config["timestep_spacing"] == "trailing"
    assert config["prediction_type"] == "v_prediction" and config["clip_sample"] is False
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(full, safety_checker=None)
    pipeline.scheduler.set_timesteps(10)
    assert pipeline.scheduler.timesteps[0] == T - 1, "trailing spacing starts sampling at the last timestep"
    assert pipeline.scheduler.alphas_cumprod[-1] == 0
    image = pipeline("a red circle", num_inference_steps=4, height=64, width=64, generator=torch.manual_seed(0))
    assert np.isfinite(np.asarray(image.images[0], np.float32)).all() and np.asarray(image.images[0]).std() > 0

    os.makedirs(resumed)
    shutil.copytree(os.path.join(full, "checkpoint-2"), os.path.join(resumed, "checkpoint-2"))
    launch.accelerate(SCRIPT, base_args(assets, resumed, recipe, "--resume_from_checkpoint latest"))
    diff = max_abs_diff(load_state_dict(os.path.join(full, "unet")), load_state_dict(os.path.join(resumed, "unet")))
    assert diff <= 1e-6, f"resumed run differs by {diff}"


# ------------------------------------------------------------------------------------------------------ optimizers
CPU_OPTIMIZERS = {
    "adafactor": "--learning_rate 1e-3",
    "lion": "--learning_rate 1e-4",
    "prodigy": "--learning_rate 1.0",
    "schedule_free_adamw": "--learning_rate 1e-3 --lr_warmup_steps 2",
}
OPTIMIZER_RUN = "--max_train_steps 5 --checkpointing_steps 2 --random_flip --lr_scheduler constant --snr_gamma 5"


@pytest.mark.parametrize("optimizer", sorted(CPU_OPTIMIZERS))
def test_each_optimizer_trains_and_resumes_exactly(launch, assets, tmp_path, optimizer):
    """The optimizer's whole state is in the checkpoint: a run resumed at step 2 ends with the same weights as the
    uninterrupted one. Schedule-free checkpoints and saves its evaluation weights (eval mode) and trains on after."""
    full, resumed = str(tmp_path / "full"), str(tmp_path / "resumed")
    flags = f"--optimizer {optimizer} {CPU_OPTIMIZERS[optimizer]} {OPTIMIZER_RUN}"
    launch.accelerate(SCRIPT, base_args(assets, full, flags))
    trained = load_state_dict(os.path.join(full, "unet"))
    assert max_abs_diff(trained, load_state_dict(os.path.join(assets["pipeline"], "unet"))) > 1e-5, "it must train"
    os.makedirs(resumed)
    shutil.copytree(os.path.join(full, "checkpoint-2"), os.path.join(resumed, "checkpoint-2"))
    launch.accelerate(SCRIPT, base_args(assets, resumed, flags, "--resume_from_checkpoint latest"))
    for folder in ["unet", "checkpoint-4/unet"]:
        diff = max_abs_diff(load_state_dict(os.path.join(full, folder)), load_state_dict(os.path.join(resumed, folder)))
        assert diff <= 1e-6, f"{optimizer}, {folder}: the resumed run differs by {diff}"
    state = torch.load(os.path.join(full, "checkpoint-4", "optimizer.bin"), weights_only=False)
    if optimizer == "schedule_free_adamw":
        assert [group["train_mode"] for group in state["param_groups"]] == [False], "saved in eval mode"
    assert state["state"], "the optimizer's state is in the checkpoint"


def test_textual_inversion_schedule_free_resumes_exactly(launch, assets, tmp_path):
    from devkit import tiny_sd

    concept = tiny_sd.write_concept_folder(str(tmp_path / "concept"), num_images=3)
    full, resumed = str(tmp_path / "full"), str(tmp_path / "resumed")
    paths = ["--pretrained_model_name_or_path", assets["pipeline"], "--train_data_dir", concept]
    flags = (
        "--placeholder_token <t> --initializer_token toy --resolution 64 --repeats 2 --train_batch_size 2 --seed 1"
        " --optimizer schedule_free_adamw --learning_rate 1e-2 --lr_warmup_steps 1 --max_train_steps 4"
        " --checkpointing_steps 2 --save_steps 2 --validation_prompt 'a <t>' --validation_steps 1"
        " --num_validation_images 1"
    )
    launch.accelerate("textual_inversion.py", command_line(*paths, "--output_dir", full, flags))
    os.makedirs(resumed)
    shutil.copytree(os.path.join(full, "checkpoint-2"), os.path.join(resumed, "checkpoint-2"))
    resume = "--resume_from_checkpoint latest"
    launch.accelerate("textual_inversion.py", command_line(*paths, "--output_dir", resumed, flags, resume))
    from safetensors.torch import load_file

    a, b = (load_file(os.path.join(run, "learned_embeds.safetensors"))["<t>"] for run in (full, resumed))
    assert (a - b).abs().max() <= 1e-6


def test_8bit_adamw_trains_on_a_gpu(launch, assets, tmp_path):
    if not torch.cuda.is_available() or importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("--optimizer adamw_8bit: bitsandbytes' 8-bit AdamW needs a CUDA GPU and bitsandbytes; none here")
    out = str(tmp_path / "run")
    launch.accelerate(SCRIPT, base_args(assets, out, "--optimizer adamw_8bit --max_train_steps 2"))
    assert max_abs_diff(load_state_dict(os.path.join(out, "unet")), load_state_dict(assets["pipeline"] + "/unet")) > 0


OPTIMIZER_ERRORS = {
    "alias conflict": ("--use_8bit_adam --optimizer lion", "--use_8bit_adam and --optimizer lion contradict"),
    "schedule-free schedule": (
        "--optimizer schedule_free_adamw --lr_scheduler cosine",
        "--optimizer schedule_free_adamw needs --lr_scheduler constant, got cosine",
    ),
    "missing package": (
        "--optimizer prodigy",
        "--optimizer prodigy needs the prodigyopt package: pip install prodigyopt",
    ),
}


@pytest.mark.parametrize("case", sorted(OPTIMIZER_ERRORS))
def test_optimizer_flag_errors(case, capsys, monkeypatch):
    flags, message = OPTIMIZER_ERRORS[case]
    if case == "missing package":  # as if prodigyopt were not installed
        find_spec = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "prodigyopt" else find_spec(name))
    assert_both_scripts_refuse(flags, message, capsys)


def test_use_8bit_adam_is_an_alias(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: name == "bitsandbytes" or find_spec(name))
    args = train_text_to_image.parse_args(
        command_line("--pretrained_model_name_or_path p --train_data_dir d --use_8bit_adam")
    )
    assert args.optimizer == "adamw_8bit"
