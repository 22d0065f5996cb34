"""Reading training images: decoded to RGB with EXIF orientation applied, checked up front so a bad file is named
before the first step."""

import concurrent.futures
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

from sdtrain.cli import UserError


def load_rgb(source, name):
    """The image at `source` (a path or a file object) as 8-bit RGB, whatever it is stored as: EXIF rotation applied,
    16-bit samples scaled to 8 bits (not clipped to white), transparency composited onto white, palette, grayscale
    and CMYK converted. Any failure, a truncated file included, raises an error that names the image."""
    try:
        with Image.open(source) as image:
            image = ImageOps.exif_transpose(image)  # decoded, and turned the way the camera was held
        if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            # 16-bit samples (I;16, and 16-bit PNGs opened as I) span 0-65535, float ones 0-1: scale, then round.
            scale = 255.0 if image.mode == "F" else 255.0 / 65535.0
            samples = np.clip(np.asarray(image, dtype=np.float64) * scale + 0.5, 0, 255).astype(np.uint8)
            image = Image.fromarray(samples, "L")
        if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
            # Transparent pixels hold arbitrary colours: show them as a viewer does, on white.
            rgba = image.convert("RGBA")
            image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
        return image.convert("RGB")
    except Exception as err:
        raise UserError(f"cannot read image {name}: {err}") from err


def verify_image(source, name):
    """Check that an image file decodes, at a fraction of a full decode: a PNG's chunk checksums cover all its bytes,
    and a JPEG decodes at 1/8 scale (its entropy-coded data is still read to the end, so truncation is caught); other
    formats decode in full. Returns the size it shows, (width, height) after EXIF rotation; a failure raises an error
    that names the image."""
    try:
        with Image.open(source) as image:
            size = image.size
            if image.format == "PNG":
                image.verify()
                exif = Image.Exif()
                exif.load(image.info.get("exif"))
            else:
                exif = image.getexif()
                if image.format == "JPEG":
                    image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
                image.load()
        if exif.get(0x0112, 1) in (5, 6, 7, 8):  # the EXIF orientations that turn the picture by 90 degrees
            size = size[::-1]
        return size
    except Exception as err:
        raise UserError(f"cannot read image {name}: {err}") from err


def inspect_images(inspect, indices):
    """inspect(i) for every i in indices, on a thread pool (decoding releases the GIL), before any training: what it
    returned for each (None where it failed), and the error messages of the images that cannot be read."""

    def attempt(index):
        try:
            return inspect(index), None
        except ValueError as err:
            return None, str(err)

    workers = min(32, 4 * (os.cpu_count() or 1))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(attempt, indices))
    return [result for result, _ in results], [problem for _, problem in results if problem is not None]


def labelled_grid(images, labels, margin=2):
    """The images side by side, each with its label (its validation prompt) written under it in PIL's default font,
    wrapped to the image's width, so a grid says what each picture was asked to show."""

    font = ImageFont.load_default()
    pen = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_height = font.getbbox("Ag|")[3] + 2
    wrapped = [
        wrap_text(label, image.width - 2 * margin, font, pen) for image, label in zip(images, labels, strict=True)
    ]
    image_height = max(image.height for image in images)
    strip_height = max(len(lines) for lines in wrapped) * line_height + 2 * margin
    grid = Image.new("RGB", (sum(image.width for image in images), image_height + strip_height), "white")
    pen = ImageDraw.Draw(grid)
    x = 0
    for image, lines in zip(images, wrapped, strict=True):
        grid.paste(image, (x, 0))
        for index, line in enumerate(lines):
            pen.text((x + margin, image_height + margin + index * line_height), line, fill="black", font=font)
        x += image.width
    return grid


def wrap_text(text, width, font, pen):
    """text as lines no wider than `width` pixels: broken between words, and inside a word longer than a line."""
    lines, line = [], ""
    for word in text.split():
        candidate = f"{line} {word}" if line else word
        if line and pen.textlength(candidate, font=font) > width:
            lines.append(line)
            candidate = word
        line = candidate
        while len(line) > 1 and pen.textlength(line, font=font) > width:
            cut = len(line) - 1
            while cut > 1 and pen.textlength(line[:cut], font=font) > width:
                cut -= 1
            lines.append(line[:cut])
            line = line[cut:]
    return [*lines, line] if line else lines or [""]
