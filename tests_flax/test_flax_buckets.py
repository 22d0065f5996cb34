"""Aspect-ratio buckets and caption edits in train_text_to_image_flax.py: the same epoch batches, pixels and captions
as the PyTorch script for the same seed, one compiled step per bucket shape, and exact mid-epoch resume."""

import json
import os
import shutil

import numpy as np
from conftest import run_torch
from safetensors.numpy import load_file

import train_text_to_image_flax as t2i_flax
from devkit.command_line import command_line
from sdtrain import batching, captions, data_config
from sdtrain.families import SD

T2I = "train_text_to_image_flax.py"
RECIPE = (
    "--use_aspect_ratio_buckets --random_flip --proportion_empty_prompts 0.3 --shuffle_caption --keep_tokens 1"
    " --caption_tag_dropout_rate 0.3"
)


def bucketed_args(assets, output_dir, *extra):
    paths = ["--pretrained_model_name_or_path", assets["pipeline"], "--train_data_dir", assets["mixed"]]
    fixed = "--resolution 64 --train_batch_size 1 --learning_rate 1e-3 --lr_warmup_steps 0 --seed 3"
    return command_line(*paths, "--output_dir", output_dir, fixed, RECIPE, *extra)


def test_pytorch_and_flax_draw_the_same_batches(assets, tmp_path):
    """Both scripts' own data code, same seed, global batch 2 (Flax: 1 per device x 2 devices; PyTorch: 2 in one
    process, through the sampler the script builds), with buckets and without: the same batches of (row, weight) in
    two epochs, the same pixels and the same edited captions."""
    args = t2i_flax.parse_args(bucketed_args(assets, str(tmp_path / "flax")))
    from transformers import CLIPTokenizerFast

    tokenizer = CLIPTokenizerFast.from_pretrained(assets["pipeline"], subfolder="tokenizer")
    rows = captions.load_image_caption_dataset(data_config.DatasetConfig.from_args(args), 3)
    dataset = t2i_flax.ImageCaptionDataset(rows, [tokenizer], args, 3, SD)
    dataset.bucket_of_row, dataset.buckets = batching.setup_buckets(
        t2i_flax.check_images(dataset), batching.BucketConfig.from_args(args), model_factor=16, global_batch_size=2
    )
    flax_batches = [batching.bucket_batches(dataset.bucket_of_row, 2, 3, epoch) for epoch in range(2)]
    flax_unbucketed = [batching.shuffled_batches(len(dataset), 2, 3, epoch) for epoch in range(2)]
    first = [dataset[(1, row)] for row, _ in flax_batches[1][0]]
    torch_argv = bucketed_args(assets, str(tmp_path / "torch"), "--train_batch_size 2")  # the last value counts
    torch_side = run_torch(f"""
import functools, json, numpy as np, torch
from accelerate import Accelerator
from transformers import CLIPTokenizer
import train_text_to_image as t2i
from sdtrain import batching, captions, data_config
args = t2i.parse_args(json.loads({json.dumps(torch_argv)!r}))
tokenizer = CLIPTokenizer.from_pretrained(args.pretrained_model_name_or_path, subfolder="tokenizer")
rows = captions.load_image_caption_dataset(data_config.DatasetConfig.from_args(args), 3)
dataset = t2i.ImageCaptionDataset(rows, [tokenizer], args, 3)
sizes = t2i.check_images(dataset.verify_image, len(dataset), Accelerator(cpu=True))
dataset.bucket_of_row, dataset.buckets = batching.setup_buckets(sizes, batching.BucketConfig.from_args(args), 16, 2)
def epochs(sampler):
    found = []
    for epoch in range(2):
        sampler.epoch = epoch
        found.append([[(row, weight) for _, row, weight in keys] for keys in sampler])
    return found
unbucketed = epochs(t2i.GlobalBatchSampler(functools.partial(batching.shuffled_batches, len(dataset), 2, 3), 2, 1))
sampler = t2i.GlobalBatchSampler(functools.partial(batching.bucket_batches, dataset.bucket_of_row, 2, 3), 2, 1)
batches = epochs(sampler)
first = [dataset[key] for key in list(iter(sampler))[0]]
np.savez({str(tmp_path / "torch.npz")!r}, pixels=np.stack([e["pixel_values"].numpy() for e in first]),
         ids=np.stack([e["input_ids"].numpy() for e in first]))  # [image, text encoder, token]
print("UNBUCKETED", json.dumps(unbucketed))
print("BATCHES", json.dumps(batches))
""")
    torch_batches = json.loads(torch_side.stdout.split("BATCHES ", 1)[1])
    assert [[[list(key) for key in batch] for batch in epoch] for epoch in flax_batches] == torch_batches
    torch_unbucketed = json.loads(torch_side.stdout.split("UNBUCKETED ", 1)[1].split("\n", 1)[0])
    assert [[[list(key) for key in batch] for batch in epoch] for epoch in flax_unbucketed] == torch_unbucketed
    assert len(flax_unbucketed[0]) == 4 and flax_unbucketed[0] != flax_unbucketed[1]  # 8 images, two orders
    recorded = np.load(tmp_path / "torch.npz")
    assert np.abs(np.stack([e["pixel_values"] for e in first]) - recorded["pixels"]).max() < 1e-6
    assert np.array_equal(np.stack([e["input_ids"] for e in first]), recorded["ids"])


def test_bucketed_flax_compiles_once_per_shape_and_resumes_exactly(launch, assets, tmp_path):
    """8 images in 4 buckets, global batch 2: 5 batches an epoch. Stopped at step 2 and resumed, the run ends with the
    weights of the run that was never stopped; each bucket shape is compiled once."""
    full, resumed = str(tmp_path / "full"), str(tmp_path / "resumed")
    steps = "--max_train_steps 6 --checkpointing_steps 2 --lr_scheduler linear"
    result = launch.run(T2I, bucketed_args(assets, full, steps))
    assert "48x80 (h x w): 3 images, 2 batches" in result.output and "updates per epoch = 5" in result.output
    compiled = [line for line in result.output.splitlines() if "Compiling the train step for" in line]
    assert len(compiled) == 4 and compiled[-1].endswith("(4 so far)"), compiled
    shutil.copytree(os.path.join(full, "checkpoint-2"), os.path.join(resumed, "checkpoint-2"))
    result = launch.run(T2I, bucketed_args(assets, resumed, steps, "--resume_from_checkpoint latest"))
    assert "starting at 2" in result.output and "batch layout changed" not in result.output
    a = load_file(os.path.join(full, "unet", "diffusion_pytorch_model.safetensors"))
    b = load_file(os.path.join(resumed, "unet", "diffusion_pytorch_model.safetensors"))
    assert max(np.abs(a[k] - b[k]).max() for k in a) <= 1e-6
