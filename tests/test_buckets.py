"""Aspect-ratio buckets, caption dropout and tag captions in train_text_to_image.py: the bucket set and assignment,
epoch batches that never mix buckets and show every image once (1 and 2 processes, through Accelerate's own batch
dealing), exact resume and cached == uncached with buckets on, deterministic caption edits, and clear errors."""

import collections
import functools
import os
import shutil

import numpy as np
import pytest
import torch
from helpers import load_state_dict, max_abs_diff
from test_speed_paths import tensorboard_losses
from test_train_text_to_image import SCRIPT, base_args

import train_text_to_image as t2i
from devkit.command_line import command_line
from sdtrain import batching, captions, data_config
from sdtrain.torch.data import GlobalBatchSampler


def test_generated_buckets_at_512():
    step = batching.bucket_step(512, 64)
    buckets = batching.generate_buckets(512, step)
    assert step == 64 and len(buckets) == 17 and (512, 512) in buckets
    for height, width in buckets:
        assert height % 64 == 0 and width % 64 == 0 and height * width <= 512 * 512
        assert 256 <= min(height, width) and max(height, width) / min(height, width) <= 4
        assert (width, height) in buckets  # every landscape bucket has its portrait twin
    assert (256, 1024) in buckets and (1024, 256) in buckets  # the 1:4 and 4:1 ends
    ratios = [width / height for height, width in buckets]
    assert ratios == sorted(ratios)
    # The tiny test pipeline (latents 1/8, one UNet downsampling) at 64 px: sides multiples of 16.
    assert batching.bucket_step(64, 16) == 16
    assert batching.generate_buckets(64, 16) == [(128, 32), (112, 32), (96, 32), (80, 48), (64, 64), (48, 80)] + [
        (32, 96),
        (32, 112),
        (32, 128),
    ]


def test_assignment_by_aspect_ratio_and_no_upscale():
    buckets = batching.generate_buckets(512, 64)
    sizes = [(800, 800), (1000, 500), (500, 1000), (4000, 500), (600, 400), (200, 100)]  # (width, height)
    assigned, extended = batching.assign_buckets(sizes, buckets, no_upscale=False, step=64)
    assert [extended[i] for i in assigned] == [(512, 512), (320, 704), (704, 320), (256, 1024), (384, 640), (320, 704)]
    assert extended == buckets
    assigned, extended = batching.assign_buckets(sizes, buckets, no_upscale=True, step=64)
    # Big enough images keep their bucket; smaller ones get one that fits inside them, or one of their own size.
    assert [extended[i] for i in assigned] == [(512, 512), (320, 704), (704, 320), (256, 1024), (384, 576), (64, 192)]
    assert extended[len(buckets) :] == [(384, 576), (64, 192)]


def test_epoch_batches_never_mix_buckets_and_show_every_image_once():
    rng = np.random.default_rng(0)
    bucket_of_row = rng.integers(0, 5, size=103).tolist()
    for epoch in range(3):
        batches = batching.bucket_batches(bucket_of_row, 8, seed=11, epoch=epoch)
        assert batches == batching.bucket_batches(bucket_of_row, 8, seed=11, epoch=epoch)  # a pure function
        assert len(batches) == sum(-(-bucket_of_row.count(b) // 8) for b in range(5))  # fixed: ceil per bucket
        seen = collections.Counter()
        for batch in batches:
            assert len(batch) == 8 and len({bucket_of_row[row] for row, _ in batch}) == 1
            assert sum(weight for _, weight in batch) == pytest.approx(8)  # weights average 1 in every batch
            seen.update(row for row, weight in batch if weight > 0)
        assert sorted(seen) == list(range(103)) and set(seen.values()) == {1}
    assert batching.bucket_batches(bucket_of_row, 8, 11, 0) != batching.bucket_batches(bucket_of_row, 8, 11, 1)


class KeyEcho(torch.utils.data.Dataset):
    """A dataset whose example is the key it was fetched with."""

    def __getitem__(self, key):
        return key


@pytest.mark.parametrize("num_processes", [1, 2])
def test_processes_get_whole_shares_of_each_batch(num_processes):
    """The sampler as the script prepares it: Accelerate's own dealing of batches to processes (and its batch skipping
    on resume) gives each process its share of every global batch, and no image twice in an epoch."""
    from accelerate.data_loader import prepare_data_loader, skip_first_batches

    bucket_of_row = [0] * 9 + [1] * 4 + [2] * 3
    epoch_global_batches = functools.partial(batching.bucket_batches, bucket_of_row, 2 * num_processes, 5)
    sampler = GlobalBatchSampler(epoch_global_batches, batch_size=2, num_processes=num_processes)
    sampler.epoch = 3
    loader = torch.utils.data.DataLoader(KeyEcho(), batch_sampler=sampler, collate_fn=lambda keys: keys)
    shares = []
    for process in range(num_processes):
        prepared = prepare_data_loader(loader, num_processes=num_processes, process_index=process, put_on_device=False)
        shares.append(list(prepared))
        assert shares[-1][2:] == list(skip_first_batches(prepared, 2))
    global_batches = batching.bucket_batches(bucket_of_row, 2 * num_processes, seed=5, epoch=3)
    assert len(shares[0]) == len(global_batches) == len(sampler) // num_processes
    for index, global_batch in enumerate(global_batches):
        together = [key for share in shares for key in share[index]]
        assert together == [(3, row, weight) for row, weight in global_batch]
    positive = [row for share in shares for batch in share for _, row, weight in batch if weight > 0]
    assert sorted(positive) == list(range(16))


def test_caption_edits_are_deterministic_and_keep_the_trigger_tags():
    config = data_config.CaptionConfig(shuffle_caption=True, keep_tokens=2, caption_tag_dropout_rate=0.3)
    caption = "sks dog, photo, red collar, grass, sunny, running, happy"
    edited = [captions.edit_caption(caption, np.random.default_rng([1, epoch, 4]), config) for epoch in range(50)]
    again = [captions.edit_caption(caption, np.random.default_rng([1, epoch, 4]), config) for epoch in range(50)]
    assert edited == again
    assert all(text.startswith("sks dog, photo") for text in edited)
    assert len(set(edited)) > 20  # shuffled and dropped differently at each use
    kept = [len(text.split(", ")) - 2 for text in edited]
    assert 0.5 < np.mean(kept) / 5 < 0.9  # about 70% of the other 5 tags survive
    assert captions.edit_caption(caption, np.random.default_rng(0), data_config.CaptionConfig()) == caption
    empty = data_config.CaptionConfig(proportion_empty_prompts=0.25)
    share = np.mean([captions.edit_caption(caption, np.random.default_rng(i), empty) == "" for i in range(2000)])
    assert 0.2 < share < 0.3


BAD_BUCKETS = {
    "side not a multiple of 8": ("--aspect_ratio_buckets '64,60'", "64,60 has a side that is not a multiple of 8"),
    "empty list": ("--aspect_ratio_buckets ''", "is not 'height,width'"),
    "not a pair": ("--aspect_ratio_buckets '64;64,64'", "'64' is not 'height,width'"),
    "listed twice": ("--aspect_ratio_buckets '64,64;64,64'", "a bucket is listed twice"),
    "tags with a text cache": ("--shuffle_caption --cache_text_embeddings", "use one or the other"),
    "dropout of 1": ("--proportion_empty_prompts 1", "--proportion_empty_prompts must be in [0, 1)"),
}


@pytest.mark.parametrize("case", sorted(BAD_BUCKETS))
def test_bad_bucket_and_caption_flags_are_clear_errors(case, capsys):
    flags, message = BAD_BUCKETS[case]
    with pytest.raises(SystemExit) as raised:
        t2i.parse_args(command_line("--pretrained_model_name_or_path p --train_data_dir d", flags))
    assert raised.value.code == 2 and message in capsys.readouterr().err


def test_a_bucket_the_model_cannot_take_is_refused_before_training(launch, assets, tmp_path):
    out = tmp_path / "out"
    result = launch.accelerate(
        SCRIPT, base_args(assets, str(out), "--aspect_ratio_buckets '64,64;40,96'", data="mixed"), check=False
    )
    assert result.returncode != 0
    # Refused from the configs, before any weights load (sdtrain.sizes), with the nearest sizes that work.
    assert "--aspect_ratio_buckets 40,96: 40 is not a multiple of 16" in result.output
    assert "the nearest valid size is 32 or 48" in result.output
    assert not os.path.exists(out)  # refused before training: nothing written, not even the folder


BUCKETED = (
    "--use_aspect_ratio_buckets --random_flip --max_train_steps 6 --checkpointing_steps 2 --lr_scheduler linear "
    "--proportion_empty_prompts 0.3 --logging_steps 2"
)
TAGS = "--shuffle_caption --keep_tokens 1 --caption_tag_dropout_rate 0.3"


def test_bucketed_training_resumes_exactly_mid_epoch(launch, assets, tmp_path):
    """8 images in 4 buckets at batch 2: 5 batches an epoch. Stopped at step 2 and resumed, the run (with tag
    shuffling, tag dropout and caption dropout on) ends with the weights of the run that was never stopped; the log
    shows the bucket histogram and validation renders at a bucket's size."""
    full, resumed = str(tmp_path / "full"), str(tmp_path / "resumed")
    validation = "--validation_prompts 'a red circle' --validation_resolution 32,96"
    result = launch.accelerate(SCRIPT, base_args(assets, full, BUCKETED, TAGS, validation, data="mixed"))
    assert "Aspect-ratio buckets (9 generated for --resolution 64: sides multiples of 16" in result.output
    assert "48x80 (h x w): 3 images, 2 batches" in result.output and "32x128 (h x w): 1 images" in result.output
    assert "updates per epoch = 5" in result.output
    shutil.copytree(os.path.join(full, "checkpoint-2"), os.path.join(resumed, "checkpoint-2"))
    resume = "--resume_from_checkpoint latest"
    result = launch.accelerate(SCRIPT, base_args(assets, resumed, BUCKETED, TAGS, validation, resume, data="mixed"))
    assert "starting at 2" in result.output and "batch layout changed" not in result.output
    diff = max_abs_diff(load_state_dict(os.path.join(full, "unet")), load_state_dict(os.path.join(resumed, "unet")))
    assert diff <= 1e-6, f"resumed run differs from the uninterrupted one by {diff}"
    from PIL import Image

    from sdtrain.images import labelled_grid

    grid = Image.open(os.path.join(full, "validation", "final-step-000006.png"))
    assert grid.size == labelled_grid([Image.new("RGB", (96, 32))], ["a red circle"]).size  # a 96x32 image, labelled


def test_bucketed_cached_training_logs_the_same_losses(launch, assets, tmp_path):
    """--cache_latents with buckets (no --center_crop needed: each image's crop is fixed) and the empty caption in
    the text cache: the same loss in every logging window as the plain run."""
    plain, cached = str(tmp_path / "plain"), str(tmp_path / "cached")
    launch.accelerate(SCRIPT, base_args(assets, plain, BUCKETED, data="mixed"))
    caches = "--cache_latents --cache_text_embeddings"
    result = launch.accelerate(SCRIPT, base_args(assets, cached, BUCKETED, caches, data="mixed"))
    assert "Cached latents: (" in result.output
    plain_losses, cached_losses = tensorboard_losses(plain), tensorboard_losses(cached)
    assert sorted(plain_losses) == sorted(cached_losses) == [2, 4, 6]
    for step in plain_losses:
        assert cached_losses[step] == pytest.approx(plain_losses[step], rel=1e-4), step
