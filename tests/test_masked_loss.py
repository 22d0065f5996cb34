"""--masked_loss: the mask follows its image's bucket crop and flip onto the latent grid, an all-ones mask trains
exactly what no mask trains, a half mask trains something else, and an image without a mask is named before training."""

import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import textual_inversion
import train_text_to_image
from devkit import tiny_sd
from devkit.command_line import command_line
from sdtrain import masks
from sdtrain.cli import UserError
from sdtrain.images import load_rgb


def pattern(width, height):
    """An asymmetric grey pattern: every pixel differs from its mirror image and from its neighbours."""
    y, x = np.mgrid[0:height, 0:width]
    return ((x * 7 + y * 3 + (x * y) % 11) % 256).astype(np.uint8)


def cut(array, left, flipped):
    """The 64-pixel-wide crop of `array` from `left`, mirrored when flipped."""
    crop = array[:, left : left + 64]
    return crop[:, ::-1] if flipped else crop


def write_png(path, rgb, alpha=None):
    image = Image.fromarray(rgb) if alpha is None else Image.fromarray(np.dstack([rgb, alpha]), "RGBA")
    image.save(path)
    return str(path)


def text_to_image_dataset(paths, pipeline, *flags, masks=None):
    """The PyTorch text-to-image script's dataset of `paths`, built as main() builds it (no model loads), in one
    64x64 bucket."""
    import datasets
    from transformers import CLIPTokenizer

    argv = ["--pretrained_model_name_or_path", pipeline, "--train_data_dir", "unused", "--resolution", "64", *flags]
    args = train_text_to_image.parse_args(argv)
    rows = datasets.Dataset.from_dict({"image": paths, "text": ["a pattern"] * len(paths), **(masks or {})})
    rows = rows.cast_column("image", datasets.Image(decode=False))
    tokenizer = CLIPTokenizer.from_pretrained(pipeline, subfolder="tokenizer")
    dataset = train_text_to_image.ImageCaptionDataset(rows, [tokenizer], args, seed=7)
    dataset.buckets, dataset.bucket_of_row = [(64, 64)], [0] * len(paths)
    dataset.image_sizes = [dataset.verify_image(row) for row in range(len(paths))]
    return dataset


def test_mask_follows_the_bucket_crop_and_flip_of_its_image(assets, tmp_path):
    """An 80x64 image in a 64x64 bucket is cropped at a random left offset (drawn once per image) and mirrored at
    random: its mask (as its alpha channel, and as a -masklabel.png beside it) gets exactly the image's crop and flip,
    then each 8x8 block's mean. The image's own pixels, carrying the same pattern, say where the crop and flip went."""
    grey = pattern(80, 64)
    rgb = np.repeat(grey[:, :, None], 3, axis=2)
    with_alpha = write_png(tmp_path / "alpha.png", rgb, alpha=grey)
    beside = write_png(tmp_path / "beside.png", rgb)
    Image.fromarray(grey).save(tmp_path / "beside-masklabel.png")
    dataset = text_to_image_dataset([with_alpha, beside], assets["pipeline"], "--masked_loss", "--random_flip")
    for row, path in enumerate([with_alpha, beside]):
        shown = np.asarray(load_rgb(path, path))[:, :, 0]  # the alpha image's colours are shown on white
        seen = set()
        for epoch in range(12):
            example = dataset[(epoch, row, 1.0)]
            pixels = ((example["pixel_values"][0].numpy() + 1.0) * 127.5).round().astype(np.uint8)
            left = dataset.crop_box(row, 80, 64, rng=None)[1][1]
            flipped = bool(pixels[0, 0] != shown[0, left])
            assert np.array_equal(pixels, cut(shown, left, flipped)), "its bucket is its size: no resampling"
            latent = (cut(grey, left, flipped).astype(np.float32) / 255.0).reshape(8, 8, 8, 8).mean(axis=(1, 3))
            assert example["mask"].shape == (1, 8, 8)
            np.testing.assert_allclose(example["mask"][0].numpy(), latent, atol=1e-6)
            seen.add(flipped)
        assert seen == {False, True} and left not in (0, 16), "the case must exercise both flips and an inner crop"
    # --cache_latents keeps the masks beside the latents: the same masks, both flips.
    dataset.masks.fill_cache(lambda row: dataset.crop_box(row, *dataset.image_sizes[row], None), 2)
    cached = dataset[(0, 0, 1.0)]
    dataset.masks.cache = None
    assert torch.equal(cached["mask"], dataset[(0, 0, 1.0)]["mask"])


def test_mask_sources_precedence_grey_levels_and_area_average(tmp_path):
    """Column over -masklabel.png over alpha; grey levels are weights; the latent grid is an area average."""
    rgb = np.zeros((16, 16, 3), np.uint8)
    image = write_png(tmp_path / "a.png", rgb, alpha=np.full((16, 16), 255, np.uint8))
    assert masks.find_mask(image, "a")[0] == "alpha"
    Image.fromarray(np.full((16, 16), 128, np.uint8)).save(tmp_path / "a-masklabel.png")
    assert masks.find_mask(image, "a")[0] == "masklabel"
    assert masks.find_mask(image, "a", column_value=image)[0] == "column"
    assert masks.find_mask(write_png(tmp_path / "plain.png", rgb), "plain") is None
    # One white pixel in an 8x8 block weighs the block 1/64; a thin edge counts by how much of its block it covers.
    grid = np.zeros((16, 16), np.uint8)
    grid[0, 0], grid[8:, 8:10] = 255, 255
    np.testing.assert_allclose(masks.latent_mask(Image.fromarray(grid))[0], [[1 / 64, 0], [0, 0.25]], atol=1e-7)
    white = masks.crop_and_flip(Image.new("L", (80, 64), 255), ((70, 87), (3, 5), (64, 64)), True, Image.LANCZOS)
    assert np.all(masks.latent_mask(white) == 1.0), "an all-white mask stays exactly 1 through a resize"


def test_a_mask_column_wins_over_the_alpha_channel(assets, tmp_path):
    """A dataset's `mask` column (paths here), through the script's dataset: it, not the image's alpha, is the mask."""
    left = np.zeros((64, 64), np.uint8)
    left[:, :32] = 255
    Image.fromarray(left).save(tmp_path / "left.png")
    image = write_png(tmp_path / "image.png", np.zeros((64, 64, 3), np.uint8), alpha=np.full((64, 64), 255, np.uint8))
    flags = ("--masked_loss", "--center_crop")
    dataset = text_to_image_dataset([image], assets["pipeline"], *flags, masks={"mask": [str(tmp_path / "left.png")]})
    assert dataset[(0, 0, 1.0)]["mask"][0].tolist() == [[1.0] * 4 + [0.0] * 4] * 8


def test_an_image_without_a_mask_is_named_before_training(assets, tmp_path):
    plain = write_png(tmp_path / "no_mask.png", np.zeros((64, 64, 3), np.uint8))
    with pytest.raises(UserError, match="no_mask.png.*has no mask.*--default_mask_value"):
        text_to_image_dataset([plain], assets["pipeline"], "--masked_loss")
    dataset = text_to_image_dataset([plain], assets["pipeline"], "--masked_loss", "--default_mask_value", "0.5")
    assert torch.all(dataset[(0, 0, 1.0)]["mask"] == 0.5)
    required = ["--pretrained_model_name_or_path", "x", "--train_data_dir", str(tmp_path)]
    with pytest.raises(UserError, match="no_mask.png.*has no mask"):
        masks.ExampleMasks(masks.MaskConfig(masked_loss=True), [plain], 64, False).check()
    with pytest.raises(SystemExit):
        textual_inversion.parse_args(
            [*required, "--placeholder_token", "<t>", "--initializer_token", "a"] + ["--default_mask_value", "0.5"]
        )  # without --masked_loss


@pytest.fixture(scope="module")
def runs(assets, launch, tmp_path_factory):
    """Three tiny textual inversion runs from one seed: no mask; --masked_loss with every example opaque (an all-ones
    mask); --masked_loss with the right half of every example masked out by a -masklabel.png, from cached latents."""
    root = tmp_path_factory.mktemp("masked")
    concept = tiny_sd.write_concept_folder(str(root / "opaque"), num_images=2, size=64)
    halved = tiny_sd.write_concept_folder(str(root / "halved"), num_images=2, size=64)
    half = np.zeros((64, 64), np.uint8)
    half[:, :32] = 255
    for name in sorted(os.listdir(concept)):
        image = Image.open(os.path.join(concept, name)).convert("RGBA")  # alpha 255 everywhere
        image.save(os.path.join(concept, name))
        Image.fromarray(half).save(os.path.join(halved, name.replace(".png", "-masklabel.png")))
    common = "--placeholder_token <blob> --initializer_token circle --resolution 64 --repeats 1 --train_batch_size 2"
    common += " --learning_rate 5e-2 --lr_warmup_steps 0 --seed 5 --max_train_steps 2"
    embeddings = {}
    for name, folder, flags in [
        ("plain", concept, ""),
        ("opaque", concept, "--masked_loss"),
        ("half", halved, "--masked_loss --cache_latents"),
    ]:
        out = str(root / f"run_{name}")
        paths = ["--pretrained_model_name_or_path", assets["pipeline"], "--train_data_dir", folder, "--output_dir", out]
        launch.accelerate("textual_inversion.py", command_line(*paths, common, *([flags] if flags else [])))
        embeddings[name] = load_file(os.path.join(out, "learned_embeds.safetensors"))["<blob>"]
    return embeddings


def test_an_all_ones_mask_trains_exactly_what_no_mask_trains(runs):
    assert torch.equal(runs["opaque"], runs["plain"])


def test_a_half_mask_trains_something_else(runs):
    assert torch.isfinite(runs["half"]).all()
    assert (runs["half"] - runs["plain"]).abs().max() > 1e-6
