"""Textual inversion of SDXL (textual_inversion.py on the tiny SDXL pipeline, devkit/tiny_sd.py TINY_SDXL): the
placeholder in both tokenizers and both embedding tables, only its rows trained, saved as diffusers' two files and the
UIs' single {"clip_l", "clip_g"} file; exact resume with cached latents, and the size conditioning of an example."""

import os
import types

import numpy as np
import pytest
import torch
from helpers import checkpoint_names, load_state_dict, max_abs_diff
from PIL import Image
from safetensors.torch import load_file

import textual_inversion
from devkit import tiny_sd
from devkit.command_line import command_line

SCRIPT = "textual_inversion.py"
TOKEN = "<cat-toy>"


@pytest.fixture(scope="module")
def concept(tmp_path_factory):
    return tiny_sd.write_concept_folder(str(tmp_path_factory.mktemp("concept")), num_images=3, size=72)


def ti_args(pipeline, concept, output_dir, *extra):
    paths = ["--pretrained_model_name_or_path", pipeline, "--train_data_dir", concept, "--output_dir", output_dir]
    token = f"--placeholder_token {TOKEN} --initializer_token circle --num_vectors 2 --resolution 64 --repeats 2"
    fixed = "--train_batch_size 2 --learning_rate 5e-2 --lr_warmup_steps 0 --seed 5 --report_to none"
    return command_line(*paths, token, fixed, *extra)


def token_table(folder):
    return load_file(os.path.join(folder, "model.safetensors"))["text_model.embeddings.token_embedding.weight"]


def test_sdxl_textual_inversion_trains_both_tables_and_saves_what_diffusers_and_the_uis_load(
    launch, sdxl_pipeline, concept, tmp_path
):
    from diffusers import StableDiffusionXLPipeline

    out = str(tmp_path / "run")
    flags = "--max_train_steps 4 --checkpointing_steps 2 --save_steps 4 --save_as_full_pipeline --center_crop"
    validation = ["--validation_prompt", f"a {TOKEN}", "--validation_steps", "3", "--num_validation_images", "1"]
    result = launch.accelerate(SCRIPT, ti_args(sdxl_pipeline, concept, out, flags) + validation)
    assert "VAE in torch.float32" in result.output
    assert checkpoint_names(out) == ["checkpoint-2", "checkpoint-4"]
    for name in checkpoint_names(out):  # the rows of both tables, and no copy of the text encoders
        files = set(os.listdir(os.path.join(out, name)))
        assert {"learned_embeds.safetensors", "learned_embeds_2.safetensors"} <= files
        assert not any("model" in file and file.endswith(".safetensors") for file in files)
    assert sorted(os.listdir(os.path.join(out, "validation"))) == [
        "final-step-000004.png",
        "validation-step-000003.png",
    ]

    rows = [load_file(os.path.join(out, f"learned_embeds{suffix}.safetensors")) for suffix in ("", "_2")]
    assert [list(r) for r in rows] == [[TOKEN], [TOKEN]] and [r[TOKEN].shape for r in rows] == [(2, 32), (2, 32)]
    steps = [load_file(os.path.join(out, f"learned_embeds{suffix}-steps-4.safetensors")) for suffix in ("", "_2")]
    assert all(torch.equal(s[TOKEN], r[TOKEN]) for s, r in zip(steps, rows, strict=True))
    ui = load_file(os.path.join(out, "cat-toy.safetensors"))  # the file A1111/Forge, ComfyUI and InvokeAI read
    assert sorted(ui) == ["clip_g", "clip_l"]
    assert torch.equal(ui["clip_l"], rows[0][TOKEN]) and torch.equal(ui["clip_g"], rows[1][TOKEN])
    readme = open(os.path.join(out, "README.md")).read()
    assert "learned_embeds_2.safetensors" in readme and "text_encoder=pipe.text_encoder_2" in readme

    # Only the new rows changed, in both tables; they learned (moved off the initializer's embedding).
    for name, learned in zip(["text_encoder", "text_encoder_2"], rows, strict=True):
        base, saved = token_table(os.path.join(sdxl_pipeline, name)), token_table(os.path.join(out, name))
        assert saved.shape == (base.shape[0] + 2, base.shape[1])
        assert torch.equal(saved[: base.shape[0]], base) and torch.equal(saved[base.shape[0] :], learned[TOKEN])
        others = {k: v for k, v in load_file(os.path.join(out, name, "model.safetensors")).items() if "token" not in k}
        base_others = load_file(os.path.join(sdxl_pipeline, name, "model.safetensors"))
        assert max_abs_diff(others, {k: base_others[k] for k in others}) == 0
    for name in ("unet", "vae"):
        assert (
            max_abs_diff(load_state_dict(os.path.join(out, name)), load_state_dict(os.path.join(sdxl_pipeline, name)))
            == 0
        )

    # diffusers: the base pipeline with the two files loaded encodes the prompt as the saved full pipeline does.
    full = StableDiffusionXLPipeline.from_pretrained(out)
    tokenizer = full.tokenizer
    circle = token_table(os.path.join(sdxl_pipeline, "text_encoder"))[tokenizer.convert_tokens_to_ids("circle</w>")]
    assert not torch.allclose(rows[0][TOKEN], circle.expand(2, -1))
    base = StableDiffusionXLPipeline.from_pretrained(sdxl_pipeline)
    for suffix, encoder in (("", "text_encoder"), ("_2", "text_encoder_2")):
        tokenizer_name = "tokenizer" + suffix
        base.load_textual_inversion(
            os.path.join(out, f"learned_embeds{suffix}.safetensors"),
            token=TOKEN,
            text_encoder=getattr(base, encoder),
            tokenizer=getattr(base, tokenizer_name),
        )
    prompt = f"a {TOKEN} on a table"
    for got, expected in zip(base.encode_prompt(prompt), full.encode_prompt(prompt), strict=True):
        if expected is not None:
            torch.testing.assert_close(got, expected)
    image = full(prompt, num_inference_steps=2, height=64, width=64, output_type="np").images[0]
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()


def test_sdxl_textual_inversion_resumes_exactly_with_cached_latents(launch, sdxl_pipeline, concept, tmp_path):
    """Uncached and uninterrupted, against cached, stopped at 2 and resumed: the same rows in both tables."""
    whole, parts = str(tmp_path / "whole"), str(tmp_path / "parts")
    launch.accelerate(SCRIPT, ti_args(sdxl_pipeline, concept, whole, "--max_train_steps 4"))
    first = ti_args(sdxl_pipeline, concept, parts, "--cache_latents --checkpointing_steps 2")
    launch.accelerate(SCRIPT, first + ["--max_train_steps", "2"])
    launch.accelerate(SCRIPT, first + ["--max_train_steps", "4", "--resume_from_checkpoint", "latest"])
    for name in ("learned_embeds.safetensors", "learned_embeds_2.safetensors"):
        expected, got = load_file(os.path.join(whole, name))[TOKEN], load_file(os.path.join(parts, name))[TOKEN]
        assert max_abs_diff({"rows": got}, {"rows": expected}) <= 1e-5, name


def test_sdxl_size_conditioning_of_an_example_follows_its_crop_and_flip(tmp_path):
    """A 101x50 image: centre-cropped to 50x50 at left 26 (torchvision's rounding), which is 33 at 64 px; mirrored,
    the crop starts 25 from the other side, 32 at 64 px. Without --center_crop the image is squeezed: no offset."""
    folder = tmp_path / "concept"
    folder.mkdir()
    Image.new("RGB", (101, 50), (200, 30, 30)).save(folder / "wide.png")
    paths = [str(folder / "wide.png")]
    for center_crop, expected in ((True, {False: 33, True: 32}), (False, {False: 0, True: 0})):
        args = types.SimpleNamespace(resolution=64, center_crop=center_crop, learnable_property="object", repeats=1)
        dataset = textual_inversion.TextualInversionDataset(paths, [], "<t>", args, seed=0, added_conditioning=True)
        for flipped, left in expected.items():
            assert dataset.time_ids(0, flipped).tolist() == [50, 101, 0, left, 64, 64]


def test_sdxl_textual_inversion_as_two_processes_learns_what_one_process_learns(
    launch, sdxl_pipeline, concept, tmp_path
):
    """Two processes of 2 (torchrun, DDP over gloo) against one of 4: both tables' rows agree. The per-example size
    conditioning travels with each process's share of the batch. Only the reduction order differs: the bound is a
    thousandth of what the last step changed, as in tests/test_textual_inversion.py (measured here: 6.3e-6)."""
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    flags = "--max_train_steps 3 --checkpointing_steps 10 --save_steps 2 --center_crop --adam_epsilon 1e-5"
    launch.accelerate(SCRIPT, ti_args(sdxl_pipeline, concept, one, flags, "--train_batch_size 4"))
    result = launch.torchrun(SCRIPT, ti_args(sdxl_pipeline, concept, two, flags))
    assert "processes = 2" in result.output and "total batch = 4" in result.output
    for name in ("learned_embeds", "learned_embeds_2"):
        rows = [load_file(os.path.join(run, f"{name}.safetensors"))[TOKEN] for run in (one, two)]
        last_step = (rows[0] - load_file(os.path.join(one, f"{name}-steps-2.safetensors"))[TOKEN]).abs().max()
        assert (rows[0] - rows[1]).abs().max() <= last_step / 1000, name
