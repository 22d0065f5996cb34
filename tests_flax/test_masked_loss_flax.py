"""--masked_loss in the Flax text-to-image script, launched as users launch it (the masked math itself is held to the
PyTorch twin's in test_parity.py): a half mask, from a -masklabel.png beside each image, trains from cached latents."""

import os

import numpy as np
from PIL import Image
from safetensors.numpy import load_file

from devkit import tiny_sd
from devkit.command_line import command_line

T2I = "train_text_to_image_flax.py"


def test_a_half_mask_trains_from_cached_latents_with_its_masks_beside_them(launch, assets, tmp_path):
    folder, out = tmp_path / "data", str(tmp_path / "run")
    folder.mkdir()
    rng = np.random.default_rng(0)
    half = np.zeros((64, 64), np.uint8)
    half[:, :32] = 255  # the left half trains, the right half does not
    for index, color in enumerate(["red", "blue"]):
        tiny_sd.draw_shape(color, "circle", 64, rng).save(folder / f"{index}.png")
        (folder / f"{index}.txt").write_text(f"a {color} circle")
        Image.fromarray(half).save(folder / f"{index}-masklabel.png")
    paths = ["--pretrained_model_name_or_path", assets["pipeline"], "--train_data_dir", folder, "--output_dir", out]
    flags = "--resolution 64 --train_batch_size 1 --learning_rate 1e-3 --lr_warmup_steps 0 --seed 3 --max_train_steps 2"
    flags += " --center_crop --random_flip --cache_latents --masked_loss"
    result = launch.run(T2I, command_line(*paths, flags))
    # The masks are not training images of their own: two images, each in both flips.
    assert "Cached latents: 2 images x 2 views" in result.output
    weights = "unet/diffusion_pytorch_model.safetensors"
    trained, base = load_file(os.path.join(out, weights)), load_file(os.path.join(assets["pipeline"], weights))
    assert all(np.isfinite(value).all() for value in trained.values())
    assert max(np.abs(trained[name] - base[name]).max() for name in base) > 0
