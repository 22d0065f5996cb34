#!/usr/bin/env python
"""Score whether a pipeline draws what its prompts ask for, and save the sample grid (prompts x seeds).

    .venv/bin/python demo/evaluate.py --pipeline demo_output/text_to_image --grid demo_output/text_to_image/samples.png
    .venv/bin/python demo/evaluate.py --pipeline demo_output/starter/pipeline \
        --embeddings demo_output/textual_inversion/learned_embeds.safetensors --token "<thing>" --expect green triangle

Prints color and shape accuracy (demo/shapes.py reads both back from each picture) as one JSON line.
"""

import argparse
import json
import os

import shapes
import torch
from PIL import Image, ImageDraw


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Score color and shape accuracy of generated shape pictures.")
    parser.add_argument("--pipeline", type=str, required=True, help="Pipeline folder to sample from.")
    parser.add_argument(
        "--unet",
        type=str,
        default=None,
        help="A UNet folder to use instead of the pipeline's (e.g. checkpoint-N/unet).",
    )
    parser.add_argument("--embeddings", type=str, default=None, help="learned_embeds file to load (textual inversion).")
    parser.add_argument("--token", type=str, default=None, help="The placeholder token of --embeddings.")
    parser.add_argument(
        "--expect", type=str, nargs=2, default=None, help="Color and shape the token's pictures should show."
    )
    parser.add_argument("--seeds", type=int, default=4, help="Pictures per prompt.")
    parser.add_argument("--steps", type=int, default=25, help="Sampling steps.")
    parser.add_argument("--guidance_scale", type=float, default=5.0, help="Classifier-free guidance (1: off).")
    parser.add_argument("--grid", type=str, default=None, help="Where to save the prompts x seeds grid PNG.")
    parser.add_argument("--height", type=int, default=64, help="Height of the generated pictures.")
    parser.add_argument("--width", type=int, default=64, help="Width of the generated pictures.")
    return parser.parse_args(argv)


def load_pipeline(args):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    extra = {"unet": UNet2DConditionModel.from_pretrained(args.unet)} if args.unet else {}
    pipeline = StableDiffusionPipeline.from_pretrained(args.pipeline, safety_checker=None, **extra)
    if args.embeddings:
        pipeline.load_textual_inversion(args.embeddings, token=args.token)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def cases(token=None, expect=None):
    """(prompt, expected color, expected shape) to sample: every color x shape, or the token's two prompts."""
    if token:
        color, shape = expect
        return [(f"a {token}", color, shape), (f"a photo of a {token}", color, shape)]
    return [(f"a {color} {shape}", color, shape) for color in shapes.COLORS for shape in shapes.SHAPES]


def evaluate(pipeline, prompts, seeds, steps, guidance_scale, height=64, width=64):
    """Every prompt with every seed: the pictures, and the fraction whose color and whose shape match."""
    rows, color_hits, shape_hits = [], 0, 0
    for prompt, color, shape in prompts:
        prompt_ids = [1000 * seed + 7 for seed in range(seeds)]
        generators = [torch.Generator().manual_seed(s) for s in prompt_ids]
        images = pipeline(
            [prompt] * seeds,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            generator=generators,
            height=height,
            width=width,
        ).images
        color_hits += sum(shapes.read_color(i) == color for i in images)
        shape_hits += sum(shapes.read_shape(i) == shape for i in images)
        rows.append((prompt, images))
    total = len(prompts) * seeds
    return rows, color_hits / total, shape_hits / total


def save_grid(rows, path, label_width=150):
    """Rows of pictures, one row per prompt, with the prompt written on the left."""
    width, height = rows[0][1][0].size
    grid = Image.new("RGB", (label_width + width * len(rows[0][1]), height * len(rows)), "white")
    pen = ImageDraw.Draw(grid)
    for r, (prompt, images) in enumerate(rows):
        pen.text((4, r * height + height // 2 - 6), prompt, fill="black")
        for c, image in enumerate(images):
            grid.paste(image, (label_width + c * width, r * height))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    grid.save(path)


def main_scores(argv=None):
    """Sample, score and (with --grid) save the grid; the figures as a dict."""
    args = parse_args(argv)
    pipeline = load_pipeline(args)
    rows, color_accuracy, shape_accuracy = evaluate(
        pipeline, cases(args.token, args.expect), args.seeds, args.steps, args.guidance_scale, args.height, args.width
    )
    if args.grid:
        save_grid(rows, args.grid)
    return {
        "color_accuracy": round(color_accuracy, 4),
        "shape_accuracy": round(shape_accuracy, 4),
        "images": len(rows) * args.seeds,
        "grid": args.grid,
    }


def main(argv=None):
    print(json.dumps(main_scores(argv)))


if __name__ == "__main__":
    main()
