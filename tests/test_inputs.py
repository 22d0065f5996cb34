"""Mistakes in what a run is given (sizes the model cannot use, a pipeline folder missing a component) are refused at
the start, by name, before any training: not at the first validation, and not as a loader error naming the pipeline."""

import os
import shutil

import pytest
from test_train_text_to_image import SCRIPT, base_args

from devkit.command_line import command_line
from sdtrain.cli import UserError
from sdtrain.sizes import check_model_sizes
from sdtrain.torch.models import ModelSource, load_component, load_model


def sizes(pipeline, resolution, validation=None, buckets=None, whole_model=False):
    validation = validation or (resolution, resolution)
    check_model_sizes(pipeline, None, None, None, resolution, validation, buckets, whole_model=whole_model)


def test_sizes_the_model_cannot_use_are_named_with_the_nearest_valid_ones(assets):
    pipeline = assets["pipeline"]  # VAE scale factor 8, UNet downsampling 2
    sizes(pipeline, 64, (64, 96), [(64, 96), (96, 64)])  # valid: no error
    sizes(pipeline, 40)  # a multiple of the VAE's 8: the PyTorch UNet upsamples to an odd skip connection
    with pytest.raises(
        UserError, match=r"--resolution 50: 50 is not a multiple of 8, .*nearest valid size is 48 or 56"
    ):
        sizes(pipeline, 50)
    with pytest.raises(UserError, match=r"--resolution 4: 4 is not a multiple of 8, .*nearest valid size is 8$"):
        sizes(pipeline, 4)
    with pytest.raises(UserError, match=r"--validation_resolution 64,36: 36 is not a multiple of 8"):
        sizes(pipeline, 64, (64, 36))
    # Every bucket side, and with whole_model (the Flax twins) every side, must also survive the UNet's downsampling.
    with pytest.raises(UserError, match=r"--aspect_ratio_buckets 64,72: 72 is not a multiple of 16, which this model "):
        sizes(pipeline, 64, None, [(64, 64), (64, 72)])
    with pytest.raises(
        UserError, match=r"--resolution 40: .* 16, .*UNet downsampling 2.*nearest valid size is 32 or 48"
    ):
        sizes(pipeline, 40, whole_model=True)


def test_resolution_50_is_refused_before_training(launch, assets, tmp_path):
    out = tmp_path / "run"
    args = base_args(assets, str(out), "--max_train_steps 2 --validation_prompts a --validation_epochs 1")
    args[args.index("--resolution") + 1] = "50"
    result = launch.accelerate(SCRIPT, args, check=False)
    assert result.returncode != 0
    assert "--resolution 50: 50 is not a multiple of 8" in result.output and "48 or 56" in result.output
    assert "Examples =" not in result.output  # the training banner: refused before it
    assert not os.path.exists(out / "unet") and not list(out.glob("checkpoint-*"))


def pipeline_copy(assets, tmp_path, name):
    return shutil.copytree(assets["pipeline"], tmp_path / name)


def test_a_missing_component_is_named(assets, tmp_path):
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModelWithProjection

    folder = pipeline_copy(assets, tmp_path, "no_vae")
    shutil.rmtree(folder / "vae")
    source = ModelSource(str(folder))
    with pytest.raises(UserError, match=r"cannot load its vae \(AutoencoderKL\): there is no vae/ folder in .*no_vae"):
        load_component(AutoencoderKL, source, "vae")
    # The sizes check, which reads the configs before any weights, says the same.
    with pytest.raises(UserError, match=r"cannot read its vae: there is no vae/ folder in .*no_vae"):
        sizes(str(folder), 64)
    # An SD pipeline given where SDXL's second text encoder is expected.
    with pytest.raises(UserError, match=r"cannot load its text_encoder_2 .*: there is no text_encoder_2/ folder"):
        load_component(CLIPTextModelWithProjection, source, "text_encoder_2")
    with pytest.raises(UserError, match=r"--pretrained_vae_model_name_or_path .*no_vae/unet: cannot load the model"):
        load_model(AutoencoderKL, str(folder / "unet"), "", "--pretrained_vae_model_name_or_path")


def test_a_unet_without_weights_is_refused_naming_the_component(launch, assets, tmp_path):
    folder = pipeline_copy(assets, tmp_path, "no_unet_weights")
    for name in os.listdir(folder / "unet"):
        if name.endswith((".safetensors", ".bin")):
            os.remove(folder / "unet" / name)
    args = base_args(assets, str(tmp_path / "run"), "--max_train_steps 1")
    args[args.index("--pretrained_model_name_or_path") + 1] = str(folder)
    result = launch.accelerate(SCRIPT, args, check=False)
    assert result.returncode != 0
    expected = "cannot load its unet (UNet2DConditionModel): there are no weights in"
    assert (
        expected in result.output
        and "diffusion_pytorch_model.safetensors or diffusion_pytorch_model.bin" in result.output
    )


def refused(parse_args, flags, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(command_line(*flags))
    assert exit_info.value.code == 2
    return capsys.readouterr().err


T2I = ("--pretrained_model_name_or_path p --train_data_dir d",)
TI = ("--pretrained_model_name_or_path p --train_data_dir d --placeholder_token <x> --initializer_token toy",)


@pytest.mark.parametrize(
    "flags, message",
    [
        ("--learning_rate 0", "--learning_rate must be positive, got 0.0"),
        ("--lr_warmup_steps -1", "--lr_warmup_steps must be 0 or more, got -1"),
        ("--max_grad_norm -1", "--max_grad_norm must be 0 (no clipping) or positive, got -1.0"),
        ("--num_train_epochs 0", "--num_train_epochs must be at least 1 (or give --max_train_steps), got 0"),
        ("--snr_gamma 0", "--snr_gamma must be positive (5.0 is recommended), got 0.0"),
        (
            "--validation_resolution 64,96",
            "--validation_resolution 64,96 sizes the validation images: add --validation_",
        ),
        ("--push_to_hub --output_dir 'sd model'", "the --output_dir name 'sd model' is not a valid Hub repository"),
        # The tests run with HF_HUB_OFFLINE=1 (conftest): the upload after training could not happen.
        ("--push_to_hub --hub_model_id me/model", "the Hub is switched off (HF_HUB_OFFLINE=1)"),
    ],
)
def test_flags_that_would_fail_or_train_nothing_later_are_refused_at_parse_time(flags, message, capsys):
    import textual_inversion
    import train_text_to_image

    assert message in refused(train_text_to_image.parse_args, T2I + (flags,), capsys)
    if "num_train_epochs" in flags:  # textual inversion always has --max_train_steps (5000 by default)
        assert textual_inversion.parse_args(command_line(*TI, flags)).num_train_epochs == 0
    else:
        assert message in refused(textual_inversion.parse_args, TI + (flags,), capsys)


def test_hub_model_id_alone_is_allowed_as_in_diffusers():
    """The model card names it, for an upload made by hand; only --push_to_hub uploads."""
    import train_text_to_image

    assert train_text_to_image.parse_args(command_line(*T2I, "--hub_model_id me/model")).hub_model_id == "me/model"


def test_textual_inversion_validation_epochs_and_lr_num_cycles_must_be_positive(capsys):
    import textual_inversion

    # 0 became --validation_steps 0: a division by zero at the first step with --validation_prompt.
    message = "--validation_epochs must be at least 1, got 0"
    assert message in refused(textual_inversion.parse_args, TI + ("--validation_epochs 0",), capsys)
    assert textual_inversion.parse_args(command_line(*TI, "--validation_epochs 2")).validation_epochs == 2
    # 0 cycles of cosine_with_restarts leave the learning rate at its peak, silently.
    assert "--lr_num_cycles must be at least 1, got 0" in refused(
        textual_inversion.parse_args, TI + ("--lr_num_cycles 0",), capsys
    )


def test_a_hub_model_whose_config_cannot_be_read_is_named():
    # The tests run offline (conftest): the hub id cannot be reached, and the message says which config was wanted.
    with pytest.raises(
        UserError, match=r"--pretrained_model_name_or_path someone/no-model: cannot read its vae config"
    ):
        sizes("someone/no-model", 64)


def test_a_scheduler_prediction_type_the_loss_cannot_train_is_refused_before_training():
    import train_text_to_image
    from sdtrain.recipes import RecipeConfig, recipe_fields

    args = train_text_to_image.parse_args(command_line(*T2I))
    recipe = RecipeConfig.from_args(args)
    assert recipe_fields(recipe, "v_prediction", 1000)["loss_type"] == args.loss_type
    with pytest.raises(UserError, match=r"prediction_type 'sample', .*pass --prediction_type epsilon or v_prediction"):
        recipe_fields(recipe, "sample", 1000)
