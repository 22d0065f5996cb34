"""SDXL in train_text_to_image.py, on a tiny SDXL pipeline (devkit/tiny_sd.py TINY_SDXL): found from the pipeline,
trained with both text encoders, the pooled text embedding and the size conditioning, and saved as a pipeline that
diffusers loads and samples; exact resume, two processes, buckets with cached latents, and other families named."""

import json
import os
import shutil

import datasets
import numpy as np
import pytest
import torch
from helpers import checkpoint_names, earlier_run_folder, load_state_dict, max_abs_diff, tree_snapshot
from safetensors import safe_open
from safetensors.torch import load_file
from test_speed_paths import tensorboard_losses
from test_textual_inversion import SCRIPT as TI_SCRIPT
from test_train_text_to_image import SCRIPT

import train_text_to_image as t2i
from devkit import tiny_sd
from devkit.command_line import command_line
from sdtrain import families, single_file
from sdtrain.cli import UserError
from sdtrain.torch.family import family_code


def sdxl_args(pipeline, data, output_dir, *extra):
    fixed = "--resolution 64 --train_batch_size 2 --learning_rate 1e-3 --lr_warmup_steps 0 --seed 7"
    paths = ["--pretrained_model_name_or_path", pipeline, "--train_data_dir", data, "--output_dir", output_dir]
    return command_line(*paths, fixed, "--report_to tensorboard", *extra)


def test_sdxl_fine_tuning_saves_a_pipeline_diffusers_loads_and_samples(launch, assets, sdxl_pipeline, tmp_path):
    """Flips, caption dropout and recipes (Min-SNR, offset noise, Huber loss, logit-normal timesteps) on SDXL."""
    from diffusers import StableDiffusionXLPipeline

    out = str(tmp_path / "run")
    recipe = "--snr_gamma 5 --noise_offset 0.05 --loss_type huber --timestep_sampling logit_normal"
    flags = "--random_flip --proportion_empty_prompts 0.5 --max_train_steps 6 --checkpointing_steps 4"
    validation = "--validation_prompts x --validation_epochs 1"  # 5 updates an epoch: rendered at 5, and at the end
    launch.accelerate(SCRIPT, sdxl_args(sdxl_pipeline, assets["images"], out, flags, recipe, validation))
    assert checkpoint_names(out) == ["checkpoint-4"]
    assert json.load(open(os.path.join(out, "model_index.json")))["_class_name"] == "StableDiffusionXLPipeline"
    assert "StableDiffusionXLPipeline.from_pretrained" in open(os.path.join(out, "README.md")).read()
    assert sorted(os.listdir(os.path.join(out, "validation"))) == [
        "final-step-000006.png",
        "validation-step-000005.png",
    ]
    trained, base = load_state_dict(os.path.join(out, "unet")), load_state_dict(os.path.join(sdxl_pipeline, "unet"))
    assert max_abs_diff(trained, base) > 0  # the UNet learned, its added embedding too
    assert max_abs_diff({"w": trained["add_embedding.linear_1.weight"]}, {"w": base["add_embedding.linear_1.weight"]})
    for name in ("text_encoder", "text_encoder_2"):  # frozen, and saved with the hub's key names
        saved = load_file(os.path.join(out, name, "model.safetensors"))
        assert all(key.startswith(("text_model.", "text_projection.")) for key in saved)
        assert max_abs_diff(saved, load_file(os.path.join(sdxl_pipeline, name, "model.safetensors"))) == 0

    pipeline = StableDiffusionXLPipeline.from_pretrained(out)
    image = pipeline("a red circle", num_inference_steps=2, height=64, width=64, output_type="np").images[0]
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()


def test_sdxl_vae_stays_in_fp32_unless_the_given_vae_needs_no_upcast(launch, assets, sdxl_pipeline, tmp_path):
    """Under bf16 the pipeline's SDXL VAE (force_upcast) runs in fp32; --pretrained_vae_model_name_or_path with an
    fp16-safe VAE (force_upcast false, as madebyollin/sdxl-vae-fp16-fix says) runs in bf16 and is the VAE saved."""
    from safetensors.torch import save_file

    safe_vae = tmp_path / "fp16-safe-vae"
    shutil.copytree(os.path.join(sdxl_pipeline, "vae"), safe_vae)
    config = json.loads((safe_vae / "config.json").read_text())
    (safe_vae / "config.json").write_text(json.dumps({**config, "force_upcast": False}))
    weights = {k: v * 1.01 for k, v in load_file(safe_vae / "diffusion_pytorch_model.safetensors").items()}
    save_file(weights, safe_vae / "diffusion_pytorch_model.safetensors")
    flags = "--mixed_precision bf16 --max_train_steps 1 --checkpointing_steps 10"
    own, given = str(tmp_path / "own"), str(tmp_path / "given")
    # Rendered mid-run (5 updates an epoch) under bf16 autocast, the fp32 VAE decodes outside it.
    validation = "--max_train_steps 6 --validation_prompts x --validation_epochs 1"
    result = launch.accelerate(SCRIPT, sdxl_args(sdxl_pipeline, assets["images"], own, flags, validation))
    assert "VAE in torch.float32 (its config asks for it: force_upcast)" in result.output
    from PIL import Image

    grid = np.asarray(Image.open(os.path.join(own, "validation", "validation-step-000005.png")), np.float32)
    assert grid.shape[1:] == (64, 3) and grid[:64].std() > 1  # a picture, not the black of a NaN decode
    vae_flag = ["--pretrained_vae_model_name_or_path", str(safe_vae)]
    result = launch.accelerate(SCRIPT, sdxl_args(sdxl_pipeline, assets["images"], given, flags, *vae_flag))
    assert "VAE in torch.bfloat16" in result.output
    saved = load_file(os.path.join(given, "vae", "diffusion_pytorch_model.safetensors"))
    assert max_abs_diff(saved, weights) == 0
    assert json.load(open(os.path.join(given, "vae", "config.json")))["force_upcast"] is False


def test_sdxl_text_conditioning_is_what_the_sdxl_pipeline_samples_with(sdxl_pipeline):
    """encode_batch gives the UNet what StableDiffusionXLPipeline.encode_prompt gives it at sampling time: the two
    encoders' penultimate states side by side and the pooled embedding; a dropped caption gives the zeros the pipeline
    samples its unconditional branch from."""
    from diffusers import StableDiffusionXLPipeline

    pipeline = StableDiffusionXLPipeline.from_pretrained(sdxl_pipeline)
    tokenizers, text_encoders = (
        [pipeline.tokenizer, pipeline.tokenizer_2],
        [pipeline.text_encoder, pipeline.text_encoder_2],
    )
    ids = t2i.token_ids(tokenizers, ["a red circle", ""], None)  # [caption, tokenizer, token], as the dataset gives
    batch = {
        "pixel_values": torch.zeros(2, 3, 64, 64),
        "input_ids": ids,
        "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2),
        "caption_kept": torch.tensor([1.0, 0.0]),
    }
    generator = torch.Generator().manual_seed(0)
    code = family_code(families.SDXL)
    _, encoder_hidden_states, added = t2i.encode_batch(
        batch, pipeline.vae, text_encoders, code, generator, t2i.BatchShare(0, 2, 2)
    )
    with torch.no_grad():
        embeds, negative, pooled, negative_pooled = pipeline.encode_prompt("a red circle", device="cpu")
    assert encoder_hidden_states.shape == (2, 77, 64) and added["text_embeds"].shape == (2, 32)
    torch.testing.assert_close(encoder_hidden_states[:1], embeds)
    torch.testing.assert_close(added["text_embeds"][:1], pooled)
    assert not negative.any() and not negative_pooled.any()  # force_zeros_for_empty_prompt
    assert not encoder_hidden_states[1].any() and not added["text_embeds"][1].any()

    # A pipeline whose model_index.json says force_zeros_for_empty_prompt: false samples its unconditional branch
    # from the encoded empty prompt: the empty caption trains as that, read once into the family.
    with open(os.path.join(sdxl_pipeline, "model_index.json")) as f:
        model_index = {**json.load(f), "force_zeros_for_empty_prompt": False}
    code = family_code(families.pipeline_family(model_index, "--pretrained_model_name_or_path x"))
    _, encoder_hidden_states, added = t2i.encode_batch(
        batch, pipeline.vae, text_encoders, code, generator, t2i.BatchShare(0, 2, 2)
    )
    with torch.no_grad():
        empty, _, empty_pooled, _ = pipeline.encode_prompt("", device="cpu", do_classifier_free_guidance=False)
    assert empty.abs().sum() > 0 and empty_pooled.abs().sum() > 0
    torch.testing.assert_close(encoder_hidden_states[1:], empty)
    torch.testing.assert_close(added["text_embeds"][1:], empty_pooled)
    torch.testing.assert_close(encoder_hidden_states[:1], embeds)


def test_sdxl_size_conditioning_is_the_original_size_the_crop_corner_and_the_target(sdxl_pipeline, tmp_path):
    """time_ids = (original height, width, crop top, left, target height, width) in the resized image's pixels; a
    mirrored image's left offset is measured from the other side (Podell et al. 2023, sec. 2.2)."""
    from PIL import Image
    from transformers import CLIPTokenizer

    path = str(tmp_path / "wide.png")
    Image.new("RGB", (100, 50), (200, 30, 30)).save(path)
    rows = datasets.Dataset.from_dict({"image": [path], "text": ["a red square"]})
    tokenizers = [CLIPTokenizer.from_pretrained(sdxl_pipeline, subfolder=name) for name in ("tokenizer", "tokenizer_2")]

    def dataset(*flags):
        args = t2i.parse_args(
            command_line("--pretrained_model_name_or_path p --train_data_dir d --resolution 64", *flags)
        )
        data = t2i.ImageCaptionDataset(rows, tokenizers, args, seed=0, added_conditioning=True)
        data.image_sizes = [(100, 50)]
        return data

    centered = dataset("--center_crop")
    assert centered[(0, 0, 1.0)]["time_ids"].tolist() == [50, 100, 0, 32, 64, 64]  # as __getitem__ wires it
    box = centered.crop_box(0, 100, 50, rng=None)
    assert box == ((64, 128), (0, 32), (64, 64))  # 100x50 resized to 128x64, the middle 64 columns
    assert centered.time_ids(0, box, flipped=False).tolist() == [50, 100, 0, 32, 64, 64]
    rng = np.random.default_rng(3)
    random = dataset()
    pixels, box, _ = random.transform(Image.open(path).convert("RGB"), 0, rng, flip=True)
    left = box[1][1]
    assert pixels.shape == (3, 64, 64) and 0 <= left <= 64
    assert random.time_ids(0, box, flipped=True).tolist() == [50, 100, 0, 128 - left - 64, 64, 64]


def test_sdxl_buckets_with_cached_latents_train_as_uncached_and_resume_exactly(launch, assets, sdxl_pipeline, tmp_path):
    """Wide, tall and square images in buckets with flips and caption dropout: the cached run (latents, both text
    encoders' states and the pooled embedding cached; time_ids from each image's size and crop) logs the plain run's
    losses; stopped at step 2 and resumed, the cached run ends with the weights of the run that was never stopped. Two
    images held out, each in its bucket: the validation loss is the same cached or not, and after the resume."""
    plain, cached, resumed = (str(tmp_path / name) for name in ("plain", "cached", "resumed"))
    flags = "--use_aspect_ratio_buckets --random_flip --proportion_empty_prompts 0.3 --max_train_steps 4"
    flags += " --checkpointing_steps 2 --logging_steps 2 --validation_split 0.25 --validation_loss_steps 2"
    caches = "--cache_latents --cache_text_embeddings"
    launch.accelerate(SCRIPT, sdxl_args(sdxl_pipeline, assets["mixed"], plain, flags))
    result = launch.accelerate(SCRIPT, sdxl_args(sdxl_pipeline, assets["mixed"], cached, flags, caches))
    assert "Cached text embeddings: (" in result.output and ", 77, 64), (" in result.output
    plain_losses, cached_losses = tensorboard_losses(plain), tensorboard_losses(cached)
    assert sorted(plain_losses) == sorted(cached_losses) == [2, 4]
    for step in plain_losses:
        assert cached_losses[step] == pytest.approx(plain_losses[step], rel=1e-4), step
    shutil.copytree(os.path.join(cached, "checkpoint-2"), os.path.join(resumed, "checkpoint-2"))
    resume = sdxl_args(sdxl_pipeline, assets["mixed"], resumed, flags, caches, "--resume_from_checkpoint latest")
    assert "starting at 2" in launch.accelerate(SCRIPT, resume).output
    difference = max_abs_diff(
        load_state_dict(os.path.join(cached, "unet")), load_state_dict(os.path.join(resumed, "unet"))
    )
    assert difference <= 1e-6
    held_out = {run: validation_losses(run) for run in (plain, cached, resumed)}
    assert sorted(held_out[plain]) == sorted(held_out[cached]) == [2, 4] and sorted(held_out[resumed]) == [4]
    for step, record in held_out[plain].items():
        assert held_out[cached][step]["per_timestep"] == pytest.approx(record["per_timestep"], rel=1e-4), step
    assert held_out[resumed][4]["per_timestep"] == pytest.approx(held_out[cached][4]["per_timestep"], rel=1e-5)
    assert tensorboard_losses(cached, "validation_loss") == pytest.approx(
        {s: r["loss"] for s, r in held_out[cached].items()}
    )


def validation_losses(output_dir):
    with open(os.path.join(output_dir, "validation_loss.jsonl")) as f:
        return {record["step"]: record for record in map(json.loads, f)}


def test_sdxl_two_processes_train_what_one_process_with_the_same_global_batch_trains(
    launch, assets, sdxl_pipeline, tmp_path
):
    """The size conditioning, the pooled embedding and the zeroed dropped captions are drawn and cut per process as
    the rest of the batch is. --adam_epsilon 1e-5, as in tests/test_multi_node.py: at Adam's default 1e-8 the rounding
    of near-zero gradients (DDP's all-reduce against one batch mean) moves weights by up to the learning rate (4e-4
    here, for SD 1.x alike)."""
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    flags = "--random_flip --proportion_empty_prompts 0.3 --max_train_steps 3 --checkpointing_steps 10"
    flags += " --adam_epsilon 1e-5"
    launch.accelerate(SCRIPT, sdxl_args(sdxl_pipeline, assets["images"], one, flags, "--train_batch_size 4"))
    result = launch.torchrun(SCRIPT, sdxl_args(sdxl_pipeline, assets["images"], two, flags))
    assert "processes = 2" in result.output and "total batch = 4" in result.output
    assert max_abs_diff(load_state_dict(os.path.join(one, "unet")), load_state_dict(os.path.join(two, "unet"))) <= 1e-5


OTHER_FAMILIES = {
    "sd3": (
        {"_class_name": "StableDiffusion3Pipeline", "transformer": ["diffusers", "SD3Transformer2DModel"]},
        "a Stable Diffusion 3 pipeline",
    ),
    "flux": (
        {"_class_name": "FluxPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"]},
        "a Flux pipeline",
    ),
    "refiner": (
        {
            "_class_name": "StableDiffusionXLImg2ImgPipeline",
            "text_encoder": [None, None],
            "tokenizer": [None, None],
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            "tokenizer_2": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        },
        "an SDXL refiner",
    ),
}


@pytest.mark.parametrize("family", sorted(OTHER_FAMILIES))
def test_other_families_are_named(family):
    model_index, message = OTHER_FAMILIES[family]
    with pytest.raises(ValueError, match=message):
        families.pipeline_family(model_index, "--pretrained_model_name_or_path x")


def test_an_sdxl_pipeline_that_lists_no_second_text_encoder_is_named():
    """Saved with text_encoder_2 None (or a folder without model_index.json and without text_encoder_2/), an SDXL
    pipeline is not taken for SD, whose training would fail at the first step deep inside the UNet."""
    model_index = {
        "_class_name": "StableDiffusionXLPipeline",
        **{name: ["transformers", "CLIPTokenizer"] for name in ("tokenizer", "tokenizer_2")},
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": [None, None],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    message = r"x is an SDXL pipeline \(StableDiffusionXLPipeline\) without its text_encoder_2: SDXL needs both"
    with pytest.raises(UserError, match=message):
        families.pipeline_family(model_index, "x")
    del model_index["text_encoder_2"], model_index["_class_name"]
    with pytest.raises(UserError, match=r"x is an SDXL pipeline \(no _class_name\) without its text_encoder_2"):
        families.pipeline_family(model_index, "x")


@pytest.mark.parametrize("script", [SCRIPT, TI_SCRIPT])
def test_an_sdxl_folder_without_text_encoder_2_is_named_by_both_scripts(
    launch, assets, sdxl_pipeline, tmp_path, script
):
    """The folder deleted (a partial download): a one-line error naming the component and the missing folder,
    before anything is written."""
    pipeline = shutil.copytree(sdxl_pipeline, tmp_path / "sdxl", ignore=shutil.ignore_patterns("text_encoder_2"))
    out = tmp_path / "out"
    extra = ["--placeholder_token", "<x>", "--initializer_token", "circle"] if script == TI_SCRIPT else []
    result = launch.accelerate(script, sdxl_args(str(pipeline), assets["images"], str(out), *extra), check=False)
    assert result.returncode != 0
    expected = f"error: --pretrained_model_name_or_path {pipeline}: cannot load its text_encoder_2 "
    assert (
        expected + f"(CLIPTextModelWithProjection): there is no text_encoder_2/ folder in {pipeline}" in result.output
    )
    assert "OSError" not in result.output  # the loader's own error named the pipeline, not the component
    assert not out.exists()


def test_an_sd3_pipeline_is_refused_by_name_before_anything_is_written(launch, assets, tmp_path):
    pipeline = tmp_path / "sd3"
    pipeline.mkdir()
    (pipeline / "model_index.json").write_text(json.dumps(OTHER_FAMILIES["sd3"][0]))
    out = tmp_path / "out"
    earlier_run_folder(out)
    (out / "keep.txt").write_text("mine")
    before = tree_snapshot(out)
    result = launch.accelerate(SCRIPT, sdxl_args(str(pipeline), assets["images"], str(out)), check=False)
    assert result.returncode != 0
    assert f"--pretrained_model_name_or_path {pipeline} is a Stable Diffusion 3 pipeline" in result.output
    after = tree_snapshot(out)
    assert after == before  # refused before training: nothing written, not even the lock


def folder_tensors(pipeline_dir):
    """(how many tensors, how many numbers) the pipeline's UNet, VAE and text encoders hold, transformers'
    position_ids buffer aside."""
    tensors = [
        tensor
        for name in ["unet", "vae", "text_encoder", "text_encoder_2"]
        for file in os.listdir(os.path.join(pipeline_dir, name))
        if file.endswith(".safetensors")
        for key, tensor in load_file(os.path.join(pipeline_dir, name, file)).items()
        if not key.endswith("position_ids")
    ]
    return len(tensors), sum(tensor.numel() for tensor in tensors)


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_sdxl_single_file_round_trips_through_diffusers(launch, assets, tmp_path, dtype):
    """--save_single_file on SDXL: the SGM layout (conditioner.embedders.0/1), every tensor of the pipeline written
    once, and read back by diffusers' StableDiffusionXLPipeline.from_single_file equal to the folder's weights."""
    from diffusers import StableDiffusionXLPipeline
    from test_single_file import components_match

    base = tiny_sd.build_sdxl_pipeline(str(tmp_path / "base"), tiny_sd.TINY_SDXL_TWO_WIDTHS, sample_size=64)
    out = str(tmp_path / "xl-run")
    flags = f"--max_train_steps 2 --checkpointing_steps 10 --save_single_file --single_file_dtype {dtype}"
    launch.accelerate(SCRIPT, sdxl_args(base, assets["images"], out, flags))
    path = os.path.join(out, "xl-run.safetensors")
    with safe_open(path, "pt") as f:
        metadata, keys = f.metadata(), list(f.keys())
        written = [f.get_tensor(key) for key in keys]
    assert {tensor.dtype for tensor in written} == {torch.float32 if dtype == "fp32" else torch.float16}
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base"
    assert metadata["training.global_step"] == "2"
    # Every number written once; OpenCLIP fuses each layer's q, k, v weights and biases (6 tensors) into 2.
    tensors, numbers = folder_tensors(out)
    assert sum(tensor.numel() for tensor in written) == numbers
    assert len(keys) == tensors - 4 * tiny_sd.TINY_SDXL_TWO_WIDTHS["text_2"]["num_hidden_layers"]
    assert {".".join(key.split(".")[:3]) for key in keys if not key.startswith("first_stage_model.")} == {
        "model.diffusion_model.input_blocks",
        "model.diffusion_model.middle_block",
        "model.diffusion_model.output_blocks",
        "model.diffusion_model.time_embed",
        "model.diffusion_model.label_emb",
        "model.diffusion_model.out",
        "conditioner.embedders.0",
        "conditioner.embedders.1",
    }
    assert "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight" in keys
    assert "conditioner.embedders.0.transformer.text_model.encoder.layers.0.mlp.fc1.weight" in keys

    folder = StableDiffusionXLPipeline.from_pretrained(out)
    single = StableDiffusionXLPipeline.from_single_file(path, config=out, local_files_only=True)
    names = ("unet", "vae", "text_encoder", "text_encoder_2")
    components_match(single, folder, torch.float32 if dtype == "fp32" else torch.float16, names)


def sdxl_configs(architecture):
    """(UNet, VAE, text encoder configs) of a tiny SDXL-style architecture, as single_file_layout reads them."""
    unet = {**architecture["unet"], "down_block_types": list(architecture["unet"]["down_block_types"])}
    unet["up_block_types"] = list(architecture["unet"]["up_block_types"])
    vae = {"down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4}
    text = [{**architecture[name], "model_type": "clip_text_model"} for name in ("text", "text_2")]
    text[0].setdefault("hidden_act", "quick_gelu")
    return unet, vae, text


def test_sdxl_single_file_layout_is_sdxl_base_only():
    """SDXL base is written; the refiner (one OpenCLIP encoder, aesthetic score in place of the target size) and an
    added embedding of another size are refused by name, as no UI would load a file with an invented layout."""
    unet, vae, text = sdxl_configs(tiny_sd.TINY_SDXL)
    assert single_file.single_file_layout(unet, vae, text) == "sdxl"
    refiner = {**unet, "projection_class_embeddings_input_dim": 32 + 5 * 8}
    for configs in [(refiner, vae, text), (unet, vae, text[1:])]:
        with pytest.raises(ValueError, match="an SDXL refiner"):
            single_file.single_file_layout(*configs)
    other = {**unet, "projection_class_embeddings_input_dim": 32 + 7 * 8}
    with pytest.raises(ValueError, match="projection_class_embeddings_input_dim=88"):
        single_file.single_file_layout(other, vae, text)
    with pytest.raises(ValueError, match="text encoders' activations"):
        single_file.single_file_layout(unet, vae, text[::-1])
