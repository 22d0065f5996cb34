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
from helpers import checkpoint_names, load_state_dict, max_abs_diff, tree_snapshot
from safetensors.torch import load_file
from test_speed_paths import tensorboard_losses
from test_train_text_to_image import SCRIPT

import train_text_to_image as t2i
from devkit.command_line import command_line
from sdtrain import families


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
    assert grid.shape == (64, 64, 3) and grid.std() > 1  # a picture, not the black of a NaN decode
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
    ids = torch.stack([t2i.tokenize(tokenizer, ["a red circle", ""], [0, 1]) for tokenizer in tokenizers], 1)
    batch = {
        "pixel_values": torch.zeros(2, 3, 64, 64),
        "input_ids": ids,
        "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2),
        "caption_kept": torch.tensor([1.0, 0.0]),
    }
    generator = torch.Generator().manual_seed(0)
    _, encoder_hidden_states, added = t2i.encode_batch(
        batch, pipeline.vae, text_encoders, generator, t2i.BatchShare(0, 2, 2)
    )
    with torch.no_grad():
        embeds, negative, pooled, negative_pooled = pipeline.encode_prompt("a red circle", device="cpu")
    assert encoder_hidden_states.shape == (2, 77, 64) and added["text_embeds"].shape == (2, 32)
    torch.testing.assert_close(encoder_hidden_states[:1], embeds)
    torch.testing.assert_close(added["text_embeds"][:1], pooled)
    assert not negative.any() and not negative_pooled.any()  # force_zeros_for_empty_prompt
    assert not encoder_hidden_states[1].any() and not added["text_embeds"][1].any()


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
        data = t2i.ImageCaptionDataset(rows, tokenizers, args, seed=0, sdxl=True)
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
    losses; stopped at step 2 and resumed, the cached run ends with the weights of the run that was never stopped."""
    plain, cached, resumed = (str(tmp_path / name) for name in ("plain", "cached", "resumed"))
    flags = "--use_aspect_ratio_buckets --random_flip --proportion_empty_prompts 0.3 --max_train_steps 4"
    flags += " --checkpointing_steps 2 --logging_steps 2"
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


def test_an_sd3_pipeline_is_refused_by_name_before_anything_is_written(launch, assets, tmp_path):
    pipeline = tmp_path / "sd3"
    pipeline.mkdir()
    (pipeline / "model_index.json").write_text(json.dumps(OTHER_FAMILIES["sd3"][0]))
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    before = tree_snapshot(out)
    result = launch.accelerate(SCRIPT, sdxl_args(str(pipeline), assets["images"], str(out)), check=False)
    assert result.returncode != 0
    assert f"--pretrained_model_name_or_path {pipeline} is a Stable Diffusion 3 pipeline" in result.output
    after = tree_snapshot(out)
    assert {k: v for k, v in after.items() if not k.startswith(".training.lock")} == before


def test_sdxl_single_file_is_refused_before_training(launch, assets, sdxl_pipeline, tmp_path):
    out = tmp_path / "run"
    flags = "--max_train_steps 1 --save_single_file"
    result = launch.accelerate(SCRIPT, sdxl_args(sdxl_pipeline, assets["images"], str(out), flags), check=False)
    assert result.returncode != 0
    assert "--save_single_file writes Stable Diffusion 1.x / 2.x checkpoints; this pipeline is SDXL" in result.output
    assert [name for name in os.listdir(out) if not name.startswith(".training.lock")] == []
