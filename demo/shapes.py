"""Colored-shape scenes for the demo: drawing them, and reading color and shape back from an image.

The reader is how the learning-quality check scores generated pictures; tests/test_demo.py measures it on real
drawings first. Everything here is numpy and PIL, so the PyTorch and Flax environments can both use it.
"""

import json
import os

import numpy as np
from PIL import Image, ImageDraw

BACKGROUND = (235, 235, 235)
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30)}
SHAPES = ["circle", "square", "triangle"]


def paint(image, color, shape, cx, cy, radius):
    """The shape, centred at (cx, cy), `radius` from its centre to its sides, painted onto the image."""
    box = [cx - radius, cy - radius, cx + radius, cy + radius]
    pen = ImageDraw.Draw(image)
    if shape == "circle":
        pen.ellipse(box, fill=COLORS[color])
    elif shape == "square":
        pen.rectangle(box, fill=COLORS[color])
    else:
        pen.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=COLORS[color])
    return image


def draw(color, shape, rng, size=64):
    """One shape of one color on a plain background, at a random position and size."""
    image = Image.new("RGB", (size, size), BACKGROUND)
    radius = int(rng.integers(size * 7 // 32, size * 11 // 32 + 1))
    cx, cy = (int(v) for v in rng.integers(radius + 2, size - radius - 2, size=2))
    return paint(image, color, shape, cx, cy, radius)


def write_shapes_dataset(folder, per_combination=20, seed=0, size=64):
    """An imagefolder with metadata.jsonl: every color x shape, `per_combination` drawings each, captioned."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "metadata.jsonl"), "w") as metadata:
        for color in COLORS:
            for shape in SHAPES:
                for i in range(per_combination):
                    name = f"{color}_{shape}_{i:03d}.png"
                    draw(color, shape, rng, size).save(os.path.join(folder, name))
                    # One caption in ten is empty (drawn anew at every use): the model also learns the unconditional
                    # picture, which classifier-free guidance needs at sampling time.
                    captions = [f"a {color} {shape}"] * 9 + [""]
                    metadata.write(json.dumps({"file_name": name, "text": captions}) + "\n")
    return folder


def draw_off_centre(color, shape, rng, width, height):
    """One shape on a wide or tall canvas, placed in the outer part of the long side: a square crop from the middle
    (what training without buckets sees) cuts it or misses it."""
    image = Image.new("RGB", (width, height), BACKGROUND)
    short, long = min(width, height), max(width, height)
    radius = int(rng.integers(short * 7 // 32, short * 11 // 32 + 1))
    across = int(rng.integers(radius + 2, short - radius - 2 + 1))
    # Along the long side: within the first or last quarter of it, whichever the draw picks.
    along = int(rng.integers(radius + 2, long // 4 + 1))
    along = along if rng.random() < 0.5 else long - along
    cx, cy = (along, across) if width >= height else (across, along)
    return paint(image, color, shape, cx, cy, radius)


def write_wide_and_tall_dataset(folder, per_combination=8, seed=5, sizes=((96, 48), (48, 96))):
    """An imagefolder of wide and tall pictures (sizes as (width, height)), every color x shape `per_combination`
    times per size, the shape off the centre; captioned as the square set, one caption in ten empty."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "metadata.jsonl"), "w") as metadata:
        for width, height in sizes:
            for color in COLORS:
                for shape in SHAPES:
                    for i in range(per_combination):
                        name = f"{width}x{height}_{color}_{shape}_{i:03d}.png"
                        draw_off_centre(color, shape, rng, width, height).save(os.path.join(folder, name))
                        captions = [f"a {color} {shape}"] * 9 + [""]
                        metadata.write(json.dumps({"file_name": name, "text": captions}) + "\n")
    return folder


def write_concept_set(folder, color="green", shape="triangle", count=5, seed=1, size=64):
    """A few drawings of one concept, no captions: the textual inversion demo learns a word for it."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    for i in range(count):
        draw(color, shape, rng, size).save(os.path.join(folder, f"{color}_{shape}_{i}.png"))
    return folder


def foreground_mask(pixels):
    """Pixels clearly away from the background gray (saturated or dark enough to be paint)."""
    pixels = pixels.astype(np.float32)
    saturation = pixels.max(axis=2) - pixels.min(axis=2)
    distance = np.abs(pixels - np.array(BACKGROUND, np.float32)).sum(axis=2)
    return (saturation > 60) & (distance > 90)


def read_color(image):
    """The palette color nearest to the median foreground pixel, or None if there is no foreground."""
    pixels = np.asarray(image.convert("RGB"))
    mask = foreground_mask(pixels)
    if mask.sum() < 12:
        return None
    median = np.median(pixels[mask].astype(np.float32), axis=0)
    return min(COLORS, key=lambda name: float(((median - np.array(COLORS[name])) ** 2).sum()))


def read_shape(image):
    """circle / square / triangle from the corners of the foreground's bounding box: a square fills all four, an
    upward triangle only the bottom two, a circle none. Corners survive blur better than a fill ratio does."""
    mask = foreground_mask(np.asarray(image.convert("RGB")))
    if mask.sum() < 12:
        return None
    rows, cols = np.nonzero(mask)
    box = mask[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    h, w = max(box.shape[0] // 5, 1), max(box.shape[1] // 5, 1)
    top = (box[:h, :w].mean() + box[:h, -w:].mean()) / 2
    bottom = (box[-h:, :w].mean() + box[-h:, -w:].mean()) / 2
    if top > 0.5 and bottom > 0.5:
        return "square"
    if bottom > 0.3 and top < 0.3:
        return "triangle"
    return "circle"
