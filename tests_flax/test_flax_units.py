"""Pieces of the Flax twins checked in-process: the JAX adapters, the learning-rate schedules and block
rematerialisation."""

import importlib
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import train_text_to_image_flax as T
from sdtrain.families import SDXL
from sdtrain.jax import checkpoints, loop, models


def test_every_jax_adapter_imports():
    """sdtrain/jax/ imports in the JAX environment with no cycle among its modules (tests/test_package.py checks that
    they import at the top)."""
    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "sdtrain", "jax")
    for name in sorted(name[:-3] for name in os.listdir(folder) if name.endswith(".py")):
        importlib.import_module(f"sdtrain.jax.{name}")


@pytest.mark.parametrize("name", ["constant", "constant_with_warmup", "linear", "cosine"])
def test_lr_scheduler_and_warmup_are_honoured(name):
    schedule = T.learning_rate_schedule(name, peak=1.0, warmup_steps=10, max_train_steps=110)
    lr = np.array([float(schedule(step)) for step in range(111)])
    if name == "constant":  # as in diffusers' get_scheduler: 'constant' ignores warmup
        assert np.allclose(lr, 1.0)
        return
    assert np.allclose(lr[:11], np.arange(11) / 10)  # linear warmup to the peak
    if name == "constant_with_warmup":
        assert np.allclose(lr[10:], 1.0)
    elif name == "linear":
        assert np.allclose(lr[10:], 1.0 - np.arange(101) / 100)
    else:
        assert np.allclose(lr[10:], 0.5 * (1 + np.cos(np.pi * np.arange(101) / 100)), atol=1e-6)


def test_gradient_checkpointing_rematerialises_every_unet_block(assets):
    from diffusers import FlaxUNet2DConditionModel

    models.enable_block_rematerialisation()
    unet, params = models.load_flax_model(FlaxUNet2DConditionModel, assets["pipeline"], "unet", None, jnp.float32)

    def loss(p):
        return unet.apply(
            {"params": p}, jnp.ones((1, 4, 8, 8)), jnp.array([3]), jnp.ones((1, 77, 32)), train=True
        ).sample.mean()

    jaxpr = str(jax.make_jaxpr(jax.grad(loss))(params))
    # Two down blocks, the mid block and two up blocks, each under its own checkpoint.
    assert jaxpr.count("checkpoint[") + jaxpr.count("remat") >= 5, "no rematerialised blocks in the gradient"


def max_difference(a, b):
    return max(float(jnp.abs(x - y).max()) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor", "lion", "prodigy", "schedule_free_adamw"])
def test_each_optimizer_state_round_trips_through_a_checkpoint(optimizer, tmp_path):
    """Through the script's own make_optimizer, save_checkpoint and restore_train_state: 2 updates, a checkpoint, a
    restore and 2 more updates give exactly the weights of 4 uninterrupted updates (accumulation and clipping on)."""
    from flax.training.train_state import TrainState

    from devkit.command_line import command_line

    # Prodigy estimates its own step size from d0 = 1e-6 up, with --learning_rate 1 as its multiplier.
    lr = 1.0 if optimizer == "prodigy" else 1e-2
    flags = f"--lr_scheduler constant --learning_rate {lr} --lr_warmup_steps 2 --gradient_accumulation_steps 2"
    args = T.parse_args(
        command_line("--pretrained_model_name_or_path p --train_data_dir d", flags, "--optimizer", optimizer)
    )
    schedule = T.learning_rate_schedule(args.lr_scheduler, args.learning_rate, args.lr_warmup_steps, 4)
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.standard_normal((8, 4)), jnp.float32), "b": jnp.zeros(4, jnp.float32)}
    batches = [jnp.asarray(rng.standard_normal((5, 8)), jnp.float32) for _ in range(8)]  # 4 updates of 2

    def loss(params, x):
        return jnp.mean((x @ params["w"] + params["b"] - 1.0) ** 2)

    step = jax.jit(lambda state, x: state.apply_gradients(grads=jax.grad(loss)(state.params, x)))
    start = TrainState.create(apply_fn=None, params=params, tx=T.make_optimizer(args, schedule))
    full = start
    for x in batches:
        full = step(full, x)
    half = start
    for x in batches[:4]:
        half = step(half, x)
    checkpoints.save_checkpoint(half, str(tmp_path), 2, {"seed": 0})
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    resumed = checkpoints.restore_train_state(start, str(tmp_path / "checkpoint-2"), device)
    for x in batches[4:]:
        resumed = step(resumed, x)
    moved = max_difference(full.params, params)
    assert moved > (1e-6 if optimizer == "prodigy" else 1e-4), f"{optimizer} must train: moved {moved}"
    for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(resumed), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b)), optimizer
    evaluated = loop.evaluation_params(full, args.optimizer)
    differs = max_difference(evaluated, full.params)
    # Schedule-free saves its average, which differs from the point it takes gradients at; the others save params.
    assert (differs > 1e-6) == (optimizer == "schedule_free_adamw")


def test_ema_follows_the_diffusers_ema_model_rule():
    """update_ema against diffusers' EMAModel (PyTorch) over updates whose decay climbs: 0 at the first update, then
    (1 + s) / (10 + s), capped at 0.9999."""
    import torch
    from diffusers.training_utils import EMAModel
    from flax.training.train_state import TrainState

    rng = np.random.default_rng(0)
    trajectory = [rng.standard_normal((3, 4)).astype(np.float32) for _ in range(8)]
    torch_weight = torch.nn.Parameter(torch.from_numpy(trajectory[0].copy()))
    reference = EMAModel([torch_weight])
    state = T.EMATrainState.create(
        apply_fn=None, params={"w": jnp.asarray(trajectory[0])}, tx=T.optax.sgd(0.0), ema_params={"w": trajectory[0]}
    )
    for global_step, weights in enumerate(trajectory[1:], start=1):
        torch_weight.data.copy_(torch.from_numpy(weights))
        reference.step([torch_weight])
        state = T.update_ema(state.replace(params={"w": jnp.asarray(weights)}), global_step)
        assert np.abs(np.asarray(state.ema_params["w"]) - reference.shadow_params[0].numpy()).max() <= 1e-6
    assert not np.allclose(state.ema_params["w"], trajectory[-1]), "the average lags the last weights"
    assert isinstance(state, TrainState)


def test_sdxl_textual_inversion_example_crops_and_conditions_as_the_pytorch_twin(tmp_path):
    """A 101x50 image (the PyTorch twin's test_sdxl_size_conditioning case): centre-cropped at torchvision's left 26,
    conditioned on left 33 at 64 px, or 32 when mirrored; without --center_crop squeezed, with no offset. The flip is
    the first draw of the example's RNG, seeded by (seed, epoch, index)."""
    import types

    from PIL import Image

    import textual_inversion_flax

    class Tokenizer:  # the prompt is not what this checks
        model_max_length = 4

        def __call__(self, prompt, **padding):
            return types.SimpleNamespace(input_ids=[0, 1, 2, 3])

    wide = np.zeros((50, 101, 3), np.uint8)
    wide[:, 26:76] = 255  # exactly the centre square is white
    Image.fromarray(wide).save(tmp_path / "wide.png")
    for center_crop, lefts in ((True, {False: 33, True: 32}), (False, {False: 0, True: 0})):
        args = types.SimpleNamespace(resolution=64, center_crop=center_crop, learnable_property="object", repeats=8)
        paths = [str(tmp_path / "wide.png")]
        dataset = textual_inversion_flax.TextualInversionDataset(paths, [Tokenizer()] * 2, "<t>", args, 0, SDXL)
        flips = set()
        for index in range(len(dataset)):
            example = dataset[(0, index)]
            flipped = bool(np.random.default_rng([0, 0, index]).random() < 0.5)
            flips.add(flipped)
            assert example["time_ids"].tolist() == [50, 101, 0, lefts[flipped], 64, 64]
            assert example["input_ids"].shape == (2, 4)
            if center_crop:
                assert example["pixel_values"].min() > 0.9, "the crop is the white centre square"
        assert flips == {False, True}


def test_a_missing_flax_component_is_named(assets, tmp_path):
    from diffusers import FlaxAutoencoderKL, FlaxUNet2DConditionModel

    from sdtrain.cli import UserError

    folder = shutil.copytree(assets["pipeline"], tmp_path / "broken")
    shutil.rmtree(folder / "vae")
    os.remove(folder / "unet" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(UserError, match=r"broken: its vae cannot be loaded: there is no vae/ folder in .*broken"):
        models.load_flax_model(FlaxAutoencoderKL, str(folder), "vae", None, jnp.float32)
    with pytest.raises(UserError, match=r"its unet cannot be loaded: there is no diffusion_pytorch_model.safetensors"):
        models.load_flax_model(FlaxUNet2DConditionModel, str(folder), "unet", None, jnp.float32)
    with pytest.raises(UserError, match=r"its text_encoder_2 cannot be loaded: there is no text_encoder_2/ folder"):
        models.load_flax_text_encoder(str(folder), None, jnp.float32, "text_encoder_2")


def test_flax_twins_refuse_flags_that_would_fail_later(capsys):
    import textual_inversion_flax
    from devkit.command_line import command_line

    twins = [
        (T.parse_args, "--pretrained_model_name_or_path p --train_data_dir d"),
        (
            textual_inversion_flax.parse_args,
            "--pretrained_model_name_or_path p --train_data_dir d --placeholder_token <x> --initializer_token toy",
        ),
    ]
    for parse_args, required in twins:
        for flags, message in [
            ("--max_grad_norm -1", "--max_grad_norm must be 0 (no clipping) or positive"),
            ("--validation_resolution 64", "--validation_resolution 64 sizes the validation images: add --validation"),
        ]:
            with pytest.raises(SystemExit):
                parse_args(command_line(required, flags))
            assert message in capsys.readouterr().err


def test_flax_twin_reads_caption_files_as_the_pytorch_twin(assets, tmp_path, caplog):
    """The shared caption reader under the Flax twin's flags: a Notepad byte-order mark is dropped, a Latin-1 file is
    named (or left out and counted with --skip_bad_captions), and the captions are summarised in one log line."""
    from devkit.command_line import command_line
    from sdtrain.captions import load_image_caption_dataset
    from sdtrain.cli import UserError
    from sdtrain.data_config import DatasetConfig

    folder = tmp_path / "photos"
    folder.mkdir()
    for name in sorted(os.listdir(assets["images"]))[:2]:
        if name.endswith(".png"):
            shutil.copy(os.path.join(assets["images"], name), folder)
    images = sorted(os.listdir(folder))
    (folder / images[0].replace(".png", ".txt")).write_bytes(b"\xef\xbb\xbfa red circle\n")
    (folder / images[1].replace(".png", ".txt")).write_bytes("a café".encode("latin-1"))

    def read(*flags):
        args = T.parse_args(command_line("--pretrained_model_name_or_path p --train_data_dir", str(folder), *flags))
        return {
            os.path.basename(row["image"]["path"]): row["text"]
            for row in load_image_caption_dataset(DatasetConfig.from_args(args), 0)
        }

    with pytest.raises(UserError, match=rf"{images[1][:-4]}\.txt is not UTF-8: byte offset 5 is 0xe9"):
        read()
    with caplog.at_level("INFO", logger="sdtrain"):
        assert read("--skip_bad_captions") == {images[0]: "a red circle"}
    assert "captions: 1 from .txt files, 0 empty, 0 with alternatives" in caplog.text
