"""train_text_to_image.py, launched as users launch it, on the tiny pipeline at 64 px."""

import json
import os
import re
import shutil

import numpy as np
import pytest
import torch
from helpers import checkpoint_names, earlier_run_folder, load_state_dict, max_abs_diff, tree_snapshot
from PIL import Image
from test_long_prompts import with_long_captions

import train_text_to_image
from devkit.command_line import command_line
from sdtrain import families, run_folder
from sdtrain.torch import checkpoints
from sdtrain.torch.validation import render_validation_images

SCRIPT = "train_text_to_image.py"
REFERENCE_FLAGS = """
--pretrained_model_name_or_path --revision --variant --dataset_name --dataset_config_name --train_data_dir
--image_column --caption_column --max_train_samples --validation_prompts --output_dir --cache_dir --seed --resolution
--center_crop --random_flip --train_batch_size --num_train_epochs --max_train_steps --gradient_accumulation_steps
--gradient_checkpointing --learning_rate --scale_lr --lr_scheduler --lr_warmup_steps --snr_gamma --dream_training
--dream_detail_preservation --use_8bit_adam --allow_tf32 --use_ema --offload_ema --foreach_ema --non_ema_revision
--dataloader_num_workers --adam_beta1 --adam_beta2 --adam_weight_decay --adam_epsilon --max_grad_norm --push_to_hub
--hub_token --prediction_type --hub_model_id --logging_dir --mixed_precision --report_to --local_rank
--checkpointing_steps --checkpoints_total_limit --resume_from_checkpoint --enable_xformers_memory_efficient_attention
--noise_offset --input_perturbation --validation_epochs --tracker_project_name --image_interpolation_mode
""".split()
# Beyond the reference: the speed paths (issue 6).
SPEED_FLAGS = {"--cache_latents", "--cache_text_embeddings", "--torch_compile", "--logging_steps"}


def base_args(assets, output_dir, *extra, data="images"):
    """The tiny run's command line; `extra` are more flags, written as on a shell command line."""
    paths = ["--pretrained_model_name_or_path", assets["pipeline"], "--train_data_dir", assets[data]]
    fixed = (
        "--resolution 64 --train_batch_size 2 --learning_rate 1e-3 --lr_warmup_steps 0 --seed 7 --report_to tensorboard"
    )
    return command_line(*paths, "--output_dir", output_dir, fixed, *extra)


def test_every_reference_flag_exists():
    args = train_text_to_image.parse_args(["--pretrained_model_name_or_path", "x", "--train_data_dir", "y"])
    parser_flags = {"--" + name for name in vars(args)}
    assert set(REFERENCE_FLAGS) - parser_flags == set()
    assert SPEED_FLAGS <= parser_flags


def test_train_checkpoints_validate_save_and_generate(launch, assets, tmp_path):
    out = str(tmp_path / "run")
    flags = (
        "--max_train_steps 7 --checkpointing_steps 2 --checkpoints_total_limit 2 --use_ema --offload_ema --foreach_ema"
    )
    validation = "--random_flip --validation_prompts 'a red circle' 'a blue square' --validation_epochs 1"
    launch.accelerate(SCRIPT, base_args(assets, out, flags, validation, "--ema_validation both"))
    # 10 images / batch 2 = 5 updates per epoch: checkpoints at 2, 4, 6, the limit keeps the last two.
    assert checkpoint_names(out) == ["checkpoint-4", "checkpoint-6"]
    hidden = sorted(n for n in os.listdir(out) if n.startswith("."))
    no_partial_folders = [".pipeline", ".pipeline-1", ".sdtrain-run.json", ".training.lock", ".training.lock.owner"]
    assert hidden == no_partial_folders, hidden
    assert os.path.islink(os.path.join(out, "unet")) and os.readlink(os.path.join(out, "unet")) == ".pipeline/unet"
    for name in ["checkpoint-4", "checkpoint-6"]:
        metadata = json.load(open(os.path.join(out, name, "checkpoint_metadata.json")))
        assert metadata["global_step"] == int(name.split("-")[1]) and metadata["seed"] == 7

    from diffusers import DiffusionPipeline, UNet2DConditionModel

    UNet2DConditionModel.from_pretrained(os.path.join(out, "checkpoint-6", "unet"))
    UNet2DConditionModel.from_pretrained(os.path.join(out, "checkpoint-6", "unet_ema"))
    pipe = DiffusionPipeline.from_pretrained(out)
    image = pipe("a red circle", num_inference_steps=2, height=64, width=64, generator=torch.manual_seed(0)).images[0]
    assert image.size == (64, 64) and np.asarray(image).std() > 0

    # The final UNet is the EMA, and both differ from the starting weights.
    final = load_state_dict(os.path.join(out, "unet"))
    assert max_abs_diff(final, load_state_dict(os.path.join(assets["pipeline"], "unet"))) > 1e-4
    assert max_abs_diff(final, load_state_dict(os.path.join(out, "checkpoint-6", "unet"))) > 0
    assert os.path.isfile(os.path.join(out, "README.md"))
    # The text encoder keeps the hub key layout, which transformers 4 and converters need.
    from safetensors.torch import load_file

    assert all(k.startswith("text_model.") for k in load_file(os.path.join(out, "text_encoder", "model.safetensors")))

    # Validation at the end of epoch 1 (step 5) and after saving (step 7), two 64 px images side by side, rendered
    # with the EMA and (--ema_validation both) with the raw weights.
    grids = sorted(os.listdir(os.path.join(out, "validation")))
    assert grids == [
        "final-raw-step-000007.png",
        "final-step-000007.png",
        "validation-raw-step-000005.png",
        "validation-step-000005.png",
    ]
    final_grid, raw_grid = (np.asarray(Image.open(os.path.join(out, "validation", n))) for n in grids[1::-1])
    final_grid, raw_grid = final_grid[:64], raw_grid[:64]  # the pictures, above their prompts
    assert final_grid.shape == raw_grid.shape == (64, 128, 3) and np.abs(final_grid - raw_grid.astype(int)).max() > 0
    # The final grid is what the saved (EMA) pipeline draws from the same seeds.
    drawn = render_validation_images(pipe, ["a red circle", "a blue square"], (64, 64), 7, torch.float32)
    assert np.array_equal(final_grid, np.concatenate([np.asarray(image) for image in drawn], axis=1))
    assert any(n.startswith("events.out.tfevents") for _, _, files in os.walk(os.path.join(out, "logs")) for n in files)


EXACT_RESUME = (
    "--max_train_steps 8 --checkpointing_steps 2 --gradient_accumulation_steps 2 --lr_scheduler cosine"
    " --lr_warmup_steps 2 --use_ema --random_flip --snr_gamma 5.0 --noise_offset 0.05 --input_perturbation 0.1"
    " --validation_prompts 'a red circle' --validation_split 0.1 --validation_loss_steps 2"
)


def test_exact_resume_mid_epoch(launch, assets, tmp_path):
    """A run stopped at step 2 (mid-epoch, with random crops, flips, caption lists, accumulation, warmup+cosine, EMA)
    and resumed ends with the same weights as the run that was never stopped, and the same validation_loss.jsonl: the
    resumed folder starts with the whole run's file, whose lines past step 2 the resumed run must drop and rewrite."""
    full, resumed = str(tmp_path / "full"), str(tmp_path / "resumed")
    launch.accelerate(SCRIPT, base_args(assets, full, EXACT_RESUME, data="images_lists"))
    os.makedirs(resumed)
    shutil.copytree(os.path.join(full, "checkpoint-2"), os.path.join(resumed, "checkpoint-2"))
    shutil.copy(os.path.join(full, "validation_loss.jsonl"), resumed)
    resume = "--resume_from_checkpoint latest"
    result = launch.accelerate(SCRIPT, base_args(assets, resumed, EXACT_RESUME, resume, data="images_lists"))
    assert "starting at 2" in result.output and "Held out 1 of 10 images" in result.output
    with open(os.path.join(full, "validation_loss.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records] == [2, 4, 6, 8] and len(records[0]["per_timestep_ema"]) == 8
    assert records[0]["timesteps"] == [62, 187, 312, 437, 562, 687, 812, 937] and records[-1]["loss"] > 0
    with open(os.path.join(resumed, "validation_loss.jsonl")) as f:
        assert [json.loads(line) for line in f] == records
    # 9 training images / (batch 2 x accumulation 2) = 3 updates per epoch: steps 2 and 8 are mid-epoch.
    assert checkpoint_names(resumed) == ["checkpoint-2", "checkpoint-4", "checkpoint-6", "checkpoint-8"]
    for folder in ["unet", "checkpoint-6/unet", "checkpoint-6/unet_ema"]:
        diff = max_abs_diff(load_state_dict(os.path.join(full, folder)), load_state_dict(os.path.join(resumed, folder)))
        assert diff <= 1e-6, f"{folder}: resumed run differs from the uninterrupted one by {diff}"
    # Validation uses fixed seeds, so the final grids match too.
    grid = "validation/final-step-000008.png"
    assert np.array_equal(
        np.asarray(Image.open(os.path.join(full, grid))), np.asarray(Image.open(os.path.join(resumed, grid)))
    )


def test_exact_resume_from_a_checkpoint_in_the_middle_of_an_epoch(launch, assets, tmp_path):
    full, resumed = str(tmp_path / "full"), str(tmp_path / "resumed")
    common = "--max_train_steps 7 --checkpointing_steps 3 --lr_scheduler linear --random_flip"
    launch.accelerate(SCRIPT, base_args(assets, full, common))
    shutil.copytree(os.path.join(full, "checkpoint-3"), os.path.join(resumed, "checkpoint-3"))
    launch.accelerate(SCRIPT, base_args(assets, resumed, common, "--resume_from_checkpoint checkpoint-3"))
    # 5 updates per epoch: step 3 is in the middle of epoch 0.
    assert (
        max_abs_diff(load_state_dict(os.path.join(full, "unet")), load_state_dict(os.path.join(resumed, "unet")))
        <= 1e-6
    )


def test_checkpoint_sets_latest_and_max_steps_are_authoritative(launch, assets, tmp_path):
    out = str(tmp_path / "run")
    common = "--checkpointing_steps 2 --checkpoints_total_limit 2 --resume_from_checkpoint latest"
    result = launch.accelerate(SCRIPT, base_args(assets, out, "--max_train_steps 6", common))
    assert "starting at 0" in result.output  # 'latest' with no checkpoint starts fresh
    assert checkpoint_names(out) == ["checkpoint-4", "checkpoint-6"]

    # What a crash leaves behind must never be picked by 'latest': a temporary folder, and a folder without its
    # completion marker.
    os.makedirs(os.path.join(out, ".checkpoint-12.partial", "unet"))
    shutil.copytree(os.path.join(out, "checkpoint-6"), os.path.join(out, "checkpoint-14"))
    os.remove(os.path.join(out, "checkpoint-14", "checkpoint_metadata.json"))
    result = launch.accelerate(SCRIPT, base_args(assets, out, "--max_train_steps 10", common))
    assert f"Resuming from {os.path.join(out, 'checkpoint-6')}" in result.output
    complete = [n for n in checkpoint_names(out) if os.path.isfile(os.path.join(out, n, "checkpoint_metadata.json"))]
    assert complete == ["checkpoint-8", "checkpoint-10"]

    # Resuming at --max_train_steps trains nothing, says so, and leaves the checkpoints alone.
    before = tree_snapshot(os.path.join(out, "checkpoint-10"))
    result = launch.accelerate(SCRIPT, base_args(assets, out, "--max_train_steps 10", common))
    assert "nothing to train" in result.output
    assert tree_snapshot(os.path.join(out, "checkpoint-10")) == before
    final, last = (load_state_dict(os.path.join(out, folder)) for folder in ["unet", "checkpoint-10/unet"])
    assert max_abs_diff(final, last) == 0


def test_checkpoint_is_invisible_until_complete(tmp_path):
    """A crash in the middle of saving leaves no checkpoint-N and prunes nothing."""
    from accelerate import PartialState

    PartialState()  # the script's logger needs accelerate's state, as it has inside main()
    out = tmp_path / "run"
    for step in (2, 4):
        (out / f"checkpoint-{step}").mkdir(parents=True)
        (out / f"checkpoint-{step}" / "checkpoint_metadata.json").write_text(json.dumps({"global_step": step}))

    class CrashingAccelerator:
        state, is_main_process = PartialState(), True  # one process, no DeepSpeed or FSDP

        def save_state(self, path):
            os.makedirs(os.path.join(path, "unet"))
            open(os.path.join(path, "optimizer.bin"), "wb").write(b"half")
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        checkpoints.save_checkpoint(CrashingAccelerator(), str(out), 6, {"seed": 1}, total_limit=1)
    assert checkpoint_names(str(out)) == ["checkpoint-2", "checkpoint-4"]
    assert [p for _, p in run_folder.list_checkpoints(str(out))][-1].endswith("checkpoint-4")

    class WorkingAccelerator:
        state, is_main_process = PartialState(), True

        def save_state(self, path):
            os.makedirs(os.path.join(path, "unet"))

    checkpoints.save_checkpoint(WorkingAccelerator(), str(out), 6, {"seed": 1}, total_limit=1)
    assert checkpoint_names(str(out)) == ["checkpoint-6"]
    assert sorted(os.listdir(out)) == ["checkpoint-6"]


def test_snr_gamma_v_prediction_bf16_gradient_checkpointing(launch, assets, tmp_path):
    out = str(tmp_path / "run")
    flags = "--max_train_steps 6 --checkpointing_steps 3 --snr_gamma 5.0 --prediction_type v_prediction --center_crop"
    precision = "--mixed_precision bf16 --gradient_checkpointing --image_interpolation_mode bicubic"
    validation = "--validation_prompts 'a red circle' --validation_epochs 1"
    launch.accelerate(SCRIPT, base_args(assets, out, flags, precision, validation))
    # Validation ran mid-training with the bf16 frozen parts and the fp32 UNet, and again on the saved pipeline.
    assert sorted(os.listdir(os.path.join(out, "validation"))) == [
        "final-step-000006.png",
        "validation-step-000005.png",
    ]
    scheduler_config = json.load(open(os.path.join(out, "scheduler", "scheduler_config.json")))
    assert scheduler_config["prediction_type"] == "v_prediction"
    # Trained weights stay fp32 master weights and are saved as such.
    assert all(t.dtype == torch.float32 for t in load_state_dict(os.path.join(out, "unet")).values())
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(out)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert np.isfinite(np.asarray(pipe("a blue square", num_inference_steps=2, height=64, width=64).images[0])).all()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights(assets, prediction_type):
    """diffusion_loss with snr_gamma weights each sample by min(SNR, gamma)/SNR (epsilon) or /(SNR+1) (v)."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_pretrained(
        assets["pipeline"], subfolder="scheduler", prediction_type=prediction_type
    )
    latents = torch.randn(32, 4, 8, 8)
    encoder_hidden_states = torch.zeros(32, 3, 32)

    def unet(noisy_latents, timesteps, encoder_hidden_states, added_cond_kwargs, return_dict):
        return (torch.zeros_like(noisy_latents),)  # predicts 0, so each sample's loss is mean(target^2)

    def loss(snr_gamma):
        config = train_text_to_image.LossConfig(prediction_type=prediction_type, snr_gamma=snr_gamma)
        generator = torch.Generator().manual_seed(3)
        return train_text_to_image.diffusion_loss(unet, scheduler, latents, encoder_hidden_states, generator, config)

    # Replay the generator's draws to get the timesteps and per-sample unweighted losses.
    generator = torch.Generator().manual_seed(3)
    noise = torch.randn(latents.shape, generator=generator)
    timesteps = torch.randint(0, 1000, (32,), generator=generator)
    target = noise if prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, timesteps)
    per_sample = (target**2).mean(dim=[1, 2, 3])
    alpha_bar = scheduler.alphas_cumprod[timesteps]
    snr = alpha_bar / (1 - alpha_bar)
    weights = torch.minimum(snr, torch.tensor(5.0)) / (snr if prediction_type == "epsilon" else snr + 1)
    assert (weights < 0.99).any(), "the draw must include low-noise timesteps for the check to bite"
    assert torch.allclose(loss(None), per_sample.mean(), rtol=1e-5)
    assert torch.allclose(loss(5.0), (per_sample * weights).mean(), rtol=1e-5)
    assert not torch.allclose(loss(5.0), loss(None))


def test_dataset_folder_with_list_captions(launch, assets, tmp_path):
    out = str(tmp_path / "run")
    args = base_args(assets, out, "--max_train_steps 2 --checkpointing_steps 100 --max_train_samples 4")
    args += ["--dataloader_num_workers", "2", "--dream_training"]
    # Each row's first caption has 200 tokens or more: --max_token_length 225 encodes them whole (issue 32).
    long_captions = with_long_captions(assets["saved_dataset"], tmp_path / "long_captions")
    data = args.index("--train_data_dir")
    args[data : data + 2] = ["--dataset_name", long_captions, "--image_column", "picture", "--max_token_length", "225"]
    result = launch.accelerate(SCRIPT, args + ["--caption_column", "captions"])
    assert "in 3 chunks of 77: 231 positions" in result.output and "captions are longer" not in result.output
    assert os.path.isfile(os.path.join(out, "unet", "diffusion_pytorch_model.safetensors"))


def test_two_processes(launch, assets, tmp_path):
    out = str(tmp_path / "run")
    # The caches are encoded half by each process and gathered: both hold all 10 rows x 2 flips.
    flags = "--max_train_steps 3 --checkpointing_steps 2 --validation_prompts 'a red circle' --use_ema --center_crop"
    caches = "--random_flip --cache_latents --cache_text_embeddings"
    result = launch.torchrun(SCRIPT, base_args(assets, out, flags, caches))
    assert "processes = 2" in result.output and "total batch = 4" in result.output
    assert "Cached latents: (10, 2, 8, 8, 8)" in result.output
    assert checkpoint_names(out) == ["checkpoint-2"]
    assert sorted(os.listdir(os.path.join(out, "validation"))) == ["final-step-000003.png"]
    from diffusers import StableDiffusionPipeline

    StableDiffusionPipeline.from_pretrained(out)


# ---------------------------------------------------------------------------------------------------- clear errors


def corrupt_imagefolder(assets, tmp_path):
    folder = tmp_path / "broken"
    shutil.copytree(assets["images"], folder)
    (folder / "0003.png").write_bytes(b"this is not a png")
    return str(folder), str(folder / "0003.png")


def nan_pipeline(assets, tmp_path):
    folder = tmp_path / "nan_pipeline"
    shutil.copytree(assets["pipeline"], folder)
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(str(folder / "unet"))
    with torch.no_grad():
        unet.conv_out.bias.fill_(float("nan"))
    unet.save_pretrained(str(folder / "unet"))
    return str(folder)


# case -> (flag overrides from (assets, tmp_path), texts the output must contain). A value of "1" is a switch.
ERROR_CASES = {
    "missing_data_dir": (
        lambda a, t: ["--train_data_dir", str(t / "nowhere")],
        lambda a, t: [f"--train_data_dir {t / 'nowhere'}: no such folder"],
    ),
    "missing_dataset_folder": (
        lambda a, t: ["--dataset_name", str(t / "no_dataset")],
        lambda a, t: [f"--dataset_name {t / 'no_dataset'}: no such folder"],
    ),
    "caption_column": (
        lambda a, t: ["--caption_column", "prompt"],
        lambda a, t: ["--caption_column 'prompt' is not a column", "its columns are: image, text"],
    ),
    "image_column": (
        lambda a, t: ["--image_column", "img"],
        lambda a, t: ["--image_column 'img' is not a column", "image, text"],
    ),
    "unreadable_image": (
        lambda a, t: ["--train_data_dir", corrupt_imagefolder(a, t)[0]],
        lambda a, t: ["cannot read image", str(t / "broken" / "0003.png")],
    ),
    "no_data_source": (
        lambda a, t: ["--train_data_dir", None],
        lambda a, t: ["pass --dataset_name", "--train_data_dir"],
    ),
    "missing_checkpoint": (
        lambda a, t: ["--resume_from_checkpoint", "checkpoint-99"],
        lambda a, t: ["--resume_from_checkpoint checkpoint-99: no complete checkpoint"],
    ),
    "cache_needs_center_crop": (
        lambda a, t: ["--cache_latents", "1"],
        lambda a, t: ["--cache_latents stores one crop per image, so it needs --center_crop"],
    ),
    "non_finite_loss": (
        lambda a, t: ["--pretrained_model_name_or_path", nan_pipeline(a, t)],
        lambda a, t: ["loss is nan at step 1"],
    ),
    "fp16_on_cpu": (
        lambda a, t: ["--mixed_precision", "fp16"],
        lambda a, t: ["--mixed_precision fp16 needs a CUDA GPU (this run is on cpu): use bf16 or no"],
    ),
    "no_samples": (lambda a, t: ["--max_train_samples", "0"], lambda a, t: ["--max_train_samples must be at least 1"]),
    "accumulation_longer_than_an_epoch": (
        lambda a, t: ["--gradient_accumulation_steps", "100"],
        lambda a, t: ["--gradient_accumulation_steps 100 is more than the 5 batches of an epoch"],
    ),
    # Optional GPU-only packages, absent here: the flags that need them say what to install.
    "no_bitsandbytes": (
        lambda a, t: ["--use_8bit_adam", "1"],
        lambda a, t: ["--use_8bit_adam needs the bitsandbytes package: pip install bitsandbytes"],
    ),
    "zero_terminal_snr_needs_v_prediction": (
        lambda a, t: ["--rescale_betas_zero_snr", "1"],
        lambda a, t: ["--rescale_betas_zero_snr needs v-prediction, and this run predicts epsilon"],
    ),
    "no_xformers": (
        lambda a, t: ["--enable_xformers_memory_efficient_attention", "1"],
        lambda a, t: ["needs xformers: pip install xformers"],
    ),
}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_clear_errors_write_nothing(launch, assets, tmp_path, case):
    make_args, expected = ERROR_CASES[case]
    out = tmp_path / "previous_run"
    (out / "unet").mkdir(parents=True)
    earlier_run_folder(out)
    (out / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"weights of an earlier run")
    before = tree_snapshot(str(out))
    args = base_args(assets, str(out), "--max_train_steps 4 --checkpointing_steps 1")
    overrides = make_args(assets, tmp_path)
    for flag, value in zip(overrides[::2], overrides[1::2], strict=True):
        if flag in args:
            index = args.index(flag)
            del args[index : index + 2]
        if value == "1":  # a switch
            args.append(flag)
        elif value is not None:
            args += [flag, value]
    result = launch.accelerate(SCRIPT, args, check=False)
    assert result.returncode != 0
    for text in expected(assets, tmp_path):
        assert text in result.output, f"expected {text!r} in:\n{result.output[-3000:]}"
    # One error line: no traceback through the script or sdtrain (only the launcher's CalledProcessError follows).
    assert not re.search(r'File ".*(train_text_to_image\.py|sdtrain/\w+\.py)", line', result.output), result.output
    after = tree_snapshot(str(out))
    assert {k: v for k, v in after.items() if k in before} == before, "a failed run changed existing files"
    if case == "non_finite_loss":  # the check runs before the step's checkpoint would be written
        assert not [k for k in after if "checkpoint" in k]


@pytest.mark.parametrize(
    "flags,stated",
    [
        ("--lr_scheduler constant --lr_warmup_steps 500", "(constant, 0 warmup)"),  # get_scheduler applies none
        ("--lr_scheduler cosine --lr_warmup_steps 500", "(cosine, 500 warmup)"),
        ("--optimizer schedule_free_adamw --lr_scheduler constant --lr_warmup_steps 50", "(constant, 50 warmup)"),
    ],
)
def test_the_model_card_states_the_warmup_the_run_applied(tmp_path, flags, stated):
    required = ["--pretrained_model_name_or_path", "p", "--train_data_dir", "d", "--output_dir", str(tmp_path)]
    args = train_text_to_image.parse_args(required + flags.split())
    assert stated in "\n".join(train_text_to_image.model_card(families.SD, args, 10, None))


@pytest.mark.parametrize("script", ["train_text_to_image", "textual_inversion"])
def test_an_unknown_tracker_is_refused_naming_the_flag(capsys, script):
    import importlib

    from accelerate.utils import LoggerType

    from sdtrain import logs

    required = "--pretrained_model_name_or_path p --train_data_dir d --placeholder_token <t> --initializer_token toy"
    if script == "train_text_to_image":
        required = required.split(" --placeholder_token")[0]
    with pytest.raises(SystemExit):
        importlib.import_module(script).parse_args(required.split() + ["--report_to", "bogus"])
    error = capsys.readouterr().err
    assert "--report_to bogus" in error and "tensorboard" in error, error
    assert set(logs.REPORT_TO_CHOICES) == {tracker.value for tracker in LoggerType} | {"none"}, "Accelerate's list"


def test_a_validation_grid_writes_each_prompt_under_its_image():
    from sdtrain.images import labelled_grid

    images = [Image.new("RGB", (64, 64), color) for color in ("red", "blue")]
    prompts = ["a red circle", "a blue square on a long line that wraps"]
    grid = np.asarray(labelled_grid(images, prompts))
    assert grid.shape[1] == 128 and grid.shape[0] > 64
    assert (grid[:64, :64] == (255, 0, 0)).all() and (grid[:64, 64:] == (0, 0, 255)).all()
    labels = grid[64:].min(axis=-1) < 128  # dark text on white
    assert labels[:, :64].sum() > 20 and labels[:, 64:].sum() > labels[:, :64].sum(), "the longer prompt, more text"
