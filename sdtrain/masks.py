"""--masked_loss: where each training image's loss mask comes from, the crop and flip it shares with its image, and its
reduction to the latent grid. Framework-free (PIL and NumPy), so the PyTorch and JAX twins weigh the same pixels.

A mask is grey levels: white (255) trains fully, black (0) not at all. Sources, the first that exists wins: the row's
`mask` column (a dataset that names its masks says what it means), a `<stem>-masklabel.png` file beside the image
(OneTrainer's convention), the image's own alpha channel (kohya's convention: opaque trains). The geometry functions
below are the ones the scripts' datasets move the images with, so an image and its mask cannot drift apart."""

import dataclasses
import functools
import io
import os

import numpy as np
from PIL import Image, ImageOps

from sdtrain.batching import center_crop_box
from sdtrain.cli import UserError
from sdtrain.images import verify_image

MASK_COLUMN = "mask"  # the dataset column a mask is read from, when the dataset has one
MASKLABEL_SUFFIX = "-masklabel.png"  # OneTrainer's mask file name: 0001-masklabel.png beside 0001.jpg
LATENT_FACTOR = 8  # the VAE's downsampling: the loss is computed on a grid 1/8 of the image's size
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def add_mask_arguments(group, dataset_column=True):
    """--masked_loss and --default_mask_value, the same flags in all four scripts (textual inversion, which reads a
    folder, has no dataset column to take masks from)."""
    column = f"its dataset column '{MASK_COLUMN}', else " if dataset_column else ""
    group.add_argument(
        "--masked_loss",
        action="store_true",
        help=(
            f"Weigh the loss per latent pixel by each image's mask (white trains, black does not): {column}a "
            f"<name>{MASKLABEL_SUFFIX} file beside it, else its alpha channel (opaque trains)."
        ),
    )
    group.add_argument(
        "--default_mask_value",
        type=float,
        default=None,
        help="With --masked_loss, the mask (0 to 1) of an image that has none; without it such an image is an error.",
    )


@dataclasses.dataclass(frozen=True)
class MaskConfig:
    """Whether the loss is masked, and the mask of an image without one (None: an error), from the flags."""

    masked_loss: bool = False
    default_mask_value: float | None = None

    @classmethod
    def from_args(cls, args):
        # Off where the flags are absent: the datasets are also built from hand-made argument namespaces (tests).
        return cls(**{field.name: getattr(args, field.name, field.default) for field in dataclasses.fields(cls)})


def mask_problem(config):
    """Why a MaskConfig cannot train (a message naming the flag), or None."""
    if config.default_mask_value is None:
        return None
    if not config.masked_loss:
        return "--default_mask_value needs --masked_loss"
    if not 0 <= config.default_mask_value <= 1:
        return f"--default_mask_value must be in [0, 1], got {config.default_mask_value}"
    return None


def masklabel_path(image_path):
    """The OneTrainer mask file of an image: photos/0001.jpg -> photos/0001-masklabel.png."""
    return os.path.splitext(image_path)[0] + MASKLABEL_SUFFIX


def is_masklabel(path):
    """Whether a file is a mask beside an image rather than a training image of its own."""
    return os.path.basename(path).lower().endswith(MASKLABEL_SUFFIX)


def has_alpha(source):
    """Whether the image at `source` (a path or a file object) has transparency; reads its header only."""
    with Image.open(source) as image:
        return image.mode in ALPHA_MODES or "transparency" in image.info


def column_source(value):
    """A `mask` column's value (a path, datasets' {"path", "bytes"}, or a decoded PIL image) as something PIL opens;
    None where the row has no mask."""
    if value is None or isinstance(value, Image.Image):
        return value
    if isinstance(value, dict):
        return io.BytesIO(value["bytes"]) if value.get("bytes") is not None else value.get("path")
    return value


def find_mask(image_source, name, column_value=None):
    """Where an image's mask comes from, in order of precedence: ("column", source), ("masklabel", path) or
    ("alpha", image_source); None when it has none. `image_source`: the image's path or file object."""
    if column_source(column_value) is not None:
        return "column", column_source(column_value)
    if isinstance(image_source, str) and os.path.isfile(masklabel_path(image_source)):
        return "masklabel", masklabel_path(image_source)
    try:
        alpha = has_alpha(image_source)
    except Exception as err:
        raise UserError(f"cannot read image {name}: {err}") from err
    finally:
        if hasattr(image_source, "seek"):
            image_source.seek(0)
    return ("alpha", image_source) if alpha else None


def require_mask(config, image_source, name, column_value=None, image_size=None):
    """Check, before training, that --masked_loss finds the image's mask (or has --default_mask_value), and that a
    separate mask has the image's size (width, height after EXIF rotation): an error names the image."""
    found = find_mask(image_source, name, column_value)
    if found is None:
        if config.default_mask_value is None:
            raise UserError(
                f"--masked_loss: image {name} has no mask (no '{MASK_COLUMN}' column value, no "
                f"{MASKLABEL_SUFFIX} file beside it, no alpha channel); add one, or pass --default_mask_value"
            )
        return
    if found[0] != "alpha" and image_size is not None:
        size = open_mask(found, name).size
        if tuple(size) != tuple(image_size):
            raise UserError(
                f"--masked_loss: the mask of image {name} is {size[0]}x{size[1]}, the image "
                f"{image_size[0]}x{image_size[1]}: a mask must have its image's size"
            )


def open_mask(found, name):
    """The mask find_mask found, as an 8-bit grey ("L") image turned as EXIF says, as load_rgb turns images."""
    kind, source = found
    try:
        if isinstance(source, Image.Image):  # a decoded dataset column
            image = ImageOps.exif_transpose(source)
        else:
            with Image.open(source) as opened:
                image = ImageOps.exif_transpose(opened)
        if kind == "alpha":
            return image.convert("RGBA").getchannel("A")
        if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            # 16-bit grey spans 0-65535, float grey 0-1: scaled to 8 bits, as load_rgb scales images.
            scale = 255.0 if image.mode == "F" else 255.0 / 65535.0
            return Image.fromarray(np.clip(np.asarray(image, np.float64) * scale + 0.5, 0, 255).astype(np.uint8), "L")
        return image.convert("L")
    except Exception as err:
        raise UserError(f"cannot read the mask of image {name}: {err}") from err


def crop_and_flip(image, box, flip, resample):
    """An image (or its mask) resized, cropped at `box` (sdtrain.batching.crop_box) and mirrored when `flip`: the
    text-to-image datasets' geometry, in PIL (torchvision's resize, crop and hflip of a PIL image do exactly this)."""
    (resized_height, resized_width), (top, left), (height, width) = box
    image = image.resize((resized_width, resized_height), resample=resample)
    image = image.crop((left, top, left + width, top + height))
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else image


def square_crop_and_flip(image, resolution, center_crop, flip):
    """An image (or its mask) as textual inversion trains on it: its central square when center_crop (cut as
    torchvision's center_crop cuts), squeezed to resolution² with bicubic resampling, mirrored when flip."""
    if center_crop:
        top, left, side = center_crop_box(*image.size)
        image = image.crop((left, top, left + side, top + side))
    image = image.resize((resolution, resolution), resample=Image.Resampling.BICUBIC)
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else image


def latent_mask(mask):
    """A training-size grey mask as float32 weights on the latent grid, shape (1, height / 8, width / 8): the mean
    of each 8x8 block (area averaging, so a thin edge weighs by how much of the block it covers), 255 -> 1."""
    values = np.asarray(mask, dtype=np.float32) / 255.0
    height, width = values.shape
    blocks = values.reshape(height // LATENT_FACTOR, LATENT_FACTOR, width // LATENT_FACTOR, LATENT_FACTOR)
    return blocks.mean(axis=(1, 3))[None]


def training_mask(config, image_source, name, size, geometry, column_value=None):
    """The image's mask as the loss weighs it: found (find_mask), moved by `geometry` (the image's own crop and
    flip, a PIL image -> PIL image function), reduced to the latent grid; --default_mask_value everywhere when the
    image has none. `size`: the training crop's (height, width)."""
    found = find_mask(image_source, name, column_value)
    if found is None:
        if config.default_mask_value is None:
            raise UserError(f"--masked_loss: image {name} has no mask; add one, or pass --default_mask_value")
        grid = (1, size[0] // LATENT_FACTOR, size[1] // LATENT_FACTOR)
        return np.full(grid, config.default_mask_value, np.float32)
    return latent_mask(geometry(open_mask(found, name)))


class DatasetMasks:
    """The text-to-image datasets' masks (both frameworks): false, and check() a pass-through, without --masked_loss.
    image_source(index): the image's (path or file object, name); rows: the dataset's rows, read for a mask column;
    resample: the PIL filter the images are resized with. fill_cache() keeps every mask beside the cached latents."""

    def __init__(self, config, image_source, rows, resample):
        self.config, self.image_source, self.rows, self.resample = config, image_source, rows, resample
        self.cache = None  # [index][flipped] -> latent-grid mask, with --cache_latents

    def __bool__(self):
        return self.config.masked_loss

    def column_value(self, index):
        return self.rows[index].get(MASK_COLUMN) if MASK_COLUMN in self.rows.column_names else None

    def check(self, index, size):
        """`size`, the image's (width, height), after checking that its mask is found (require_mask)."""
        if self:
            require_mask(self.config, *self.image_source(index), self.column_value(index), size)
        return size

    def __call__(self, index, box, flip):
        """The image's mask moved exactly as the image is (crop_and_flip at `box`), on the latent grid."""
        if self.cache is not None:
            return self.cache[index][int(flip)]
        geometry = functools.partial(crop_and_flip, box=box, flip=flip, resample=self.resample)
        return training_mask(self.config, *self.image_source(index), box[2], geometry, self.column_value(index))

    def fill_cache(self, box_of, views):
        """--cache_latents, with --masked_loss: every image's mask beside its latents, at its fixed crop box_of(index)
        (read only then), unflipped and (views 2) mirrored; __call__ then reads the cache, whatever box it is given."""
        if self:
            boxes = [box_of(index) for index in range(len(self.rows))]
            self.cache = [[self(index, box, view == 1) for view in range(views)] for index, box in enumerate(boxes)]


class ExampleMasks:
    """Textual inversion's masks (both frameworks), of its folder of example images: false without --masked_loss.
    check() finds every mask before any model loads; fill_cache() keeps them beside the cached latents."""

    def __init__(self, config, image_paths, resolution, center_crop):
        self.config, self.image_paths, self.resolution, self.center_crop = config, image_paths, resolution, center_crop
        self.cache = None  # [image][flipped] -> latent-grid mask, with --cache_latents

    def __bool__(self):
        return self.config.masked_loss

    def check(self):
        for path in self.image_paths if self else []:
            require_mask(self.config, path, path, image_size=verify_image(path, path))

    def __call__(self, index, flip):
        """The example's mask moved exactly as its image is (square_crop_and_flip), on the latent grid."""
        if self.cache is not None:
            return self.cache[index][int(flip)]
        geometry = functools.partial(square_crop_and_flip, resolution=self.resolution, center_crop=self.center_crop)
        path, size = self.image_paths[index], (self.resolution, self.resolution)
        return training_mask(self.config, path, path, size, functools.partial(geometry, flip=flip))

    def fill_cache(self):
        self.cache = [[self(index, flip) for flip in (False, True)] for index in range(len(self.image_paths))]
