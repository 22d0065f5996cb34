"""The fast paths train what the plain path trains: --cache_latents / --cache_text_embeddings hold what encoding each
sample in the loop would give (flips and caption choices included), logging reads the device once per window, and
--torch_compile saves models that load."""

import os

import numpy as np
import pytest
import torch
from helpers import checkpoint_names, load_state_dict, max_abs_diff

import textual_inversion
import train_text_to_image
from devkit.command_line import command_line
from sdtrain import captions, data_config, embeddings, families
from sdtrain.torch.family import family_code

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cpu_accelerator():
    from accelerate import Accelerator

    return Accelerator(cpu=True)


def load_frozen_models(pipeline):
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(pipeline, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(pipeline, subfolder="text_encoder").eval()
    vae = AutoencoderKL.from_pretrained(pipeline, subfolder="vae").eval()
    return tokenizer, text_encoder, vae


def test_text_to_image_caches_equal_encoding_in_the_loop(assets):
    """Every (epoch, row) sample of the cached dataset holds the VAE distribution and text-encoder output that the
    uncached sample encodes to: same flip, same caption drawn from each row's list."""
    tokenizer, text_encoder, vae = load_frozen_models(assets["pipeline"])
    paths = ["--pretrained_model_name_or_path", assets["pipeline"], "--train_data_dir", assets["images_lists"]]
    flags = "--resolution 64 --center_crop --random_flip --cache_latents --cache_text_embeddings --train_batch_size 3"
    args = train_text_to_image.parse_args(command_line(*paths, flags))
    rows = captions.load_image_caption_dataset(data_config.DatasetConfig.from_args(args), 7)
    plain = train_text_to_image.ImageCaptionDataset(rows, [tokenizer], args, 7)
    cached = train_text_to_image.ImageCaptionDataset(rows, [tokenizer], args, 7)
    code = family_code(families.SD)
    train_text_to_image.build_caches(cached, vae, [text_encoder], code, cpu_accelerator(), args, num_workers=0)
    _, _, cache = cached.latent_cache  # without buckets, one group of every row
    assert [tuple(t.shape) for t in cache] == [(len(rows), 2, 8, 8, 8)]  # rows x flips x (mean, logvar) x 8 x 8
    assert cache[0].dtype == vae.dtype
    flips, texts = set(), set()
    for key in [(epoch, row, 1.0) for epoch in range(3) for row in range(len(rows))]:
        expected, got = plain[key], cached[key]
        assert "pixel_values" not in got and "input_ids" not in got, "the cached path must not load images or tokenize"
        with torch.no_grad():
            latents = vae.encode(expected["pixel_values"][None]).latent_dist.parameters[0]
            hidden = text_encoder(expected["input_ids"], return_dict=False)[0][0]  # one row of ids per text encoder
        assert torch.allclose(got["latent_parameters"], latents, atol=1e-5), key
        assert torch.allclose(got["encoder_hidden_states"], hidden, atol=1e-5), key
        flips.add(bool(torch.equal(got["latent_parameters"], cache[0][key[1], 1])))
        texts.add(tokenizer.decode(expected["input_ids"][0], skip_special_tokens=True))
    assert flips == {False, True}, "the check must see both flips"
    assert len(texts) > len(rows), "the check must see several captions of a row's list"


def test_textual_inversion_cache_equals_encoding_in_the_loop(assets, tmp_path):
    from devkit import tiny_sd

    concept = tiny_sd.write_concept_folder(str(tmp_path / "concept"), num_images=3, size=72)
    tokenizer, _, vae = load_frozen_models(assets["pipeline"])
    paths = ["--pretrained_model_name_or_path", assets["pipeline"], "--train_data_dir", concept]
    flags = "--placeholder_token <t> --initializer_token toy --resolution 64 --repeats 4 --train_batch_size 4"
    args = textual_inversion.parse_args(command_line(*paths, flags, "--cache_latents"))
    paths = embeddings.find_example_images(concept)
    plain = textual_inversion.TextualInversionDataset(paths, [tokenizer], "<t>", args, 5)
    cached = textual_inversion.TextualInversionDataset(paths, [tokenizer], "<t>", args, 5)
    textual_inversion.build_latent_cache(cached, vae, cpu_accelerator(), args, num_workers=0)
    assert tuple(cached.latent_cache.shape) == (3, 2, 8, 8, 8)
    for key in [(epoch, index, 1.0) for epoch in range(2) for index in range(len(plain))]:
        expected, got = plain[key], cached[key]
        with torch.no_grad():
            latents = vae.encode(expected["pixel_values"][None]).latent_dist.parameters[0]
        assert torch.allclose(got["latent_parameters"], latents, atol=1e-5), key
        assert torch.equal(got["input_ids"], expected["input_ids"])


def tensorboard_losses(output_dir, tag="loss"):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found = {}
    for root, _, files in os.walk(os.path.join(output_dir, "logs")):
        if any(name.startswith("events.out.tfevents") for name in files):
            events = EventAccumulator(root)
            events.Reload()
            if tag in events.Tags()["scalars"]:
                found.update({event.step: event.value for event in events.Scalars(tag)})
    return found


def test_cached_training_logs_the_same_losses_in_windows(launch, assets, tmp_path):
    """Cached and uncached runs log the same loss for each window of --logging_steps updates (and at checkpoints and
    the last step, which also read the loss back); the cached run loads its caches in two dataloader workers."""
    from test_train_text_to_image import SCRIPT, base_args

    common = "--max_train_steps 7 --checkpointing_steps 5 --logging_steps 3 --center_crop --random_flip"
    plain, cached = str(tmp_path / "plain"), str(tmp_path / "cached")
    launch.accelerate(SCRIPT, base_args(assets, plain, common, data="images_lists"))
    caches = "--cache_latents --cache_text_embeddings --dataloader_num_workers 2"
    result = launch.accelerate(SCRIPT, base_args(assets, cached, common, caches, data="images_lists"))
    assert "Cached latents: (10, 2, 8, 8, 8)" in result.output and "Cached text embeddings: (" in result.output
    assert "step 3: loss=" in result.output and "images_per_second=" in result.output
    plain_losses, cached_losses = tensorboard_losses(plain), tensorboard_losses(cached)
    assert sorted(plain_losses) == sorted(cached_losses) == [3, 5, 6, 7]
    for step in plain_losses:
        assert cached_losses[step] == pytest.approx(plain_losses[step], rel=1e-4), step
    assert checkpoint_names(cached) == ["checkpoint-5"]
    from diffusers import StableDiffusionPipeline

    StableDiffusionPipeline.from_pretrained(cached)


def test_torch_compile_saves_plain_loadable_models(launch, assets, tmp_path):
    from test_train_text_to_image import SCRIPT, base_args

    out = str(tmp_path / "run")
    launch.accelerate(SCRIPT, base_args(assets, out, "--max_train_steps 2 --checkpointing_steps 2 --torch_compile"))
    reference = load_state_dict(os.path.join(assets["pipeline"], "unet"))
    for folder in ["unet", "checkpoint-2/unet"]:
        trained = load_state_dict(os.path.join(out, folder))
        assert trained.keys() == reference.keys(), "compiled-module prefixes leaked into the saved keys"
        assert max_abs_diff(trained, reference) > 0
    assert np.isfinite(np.concatenate([t.flatten().numpy() for t in trained.values()])).all()
