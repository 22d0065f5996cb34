"""An epoch as global batches of (row, weight), from (seed, epoch) alone, the aspect-ratio buckets they are cut from,
and the crop each image trains on with SDXL's size conditioning of it. The same functions in PyTorch and JAX, so both
frameworks see the same batches and the same pixels."""

import dataclasses
import logging
import math

import numpy as np

from sdtrain.cli import UserError
from sdtrain.seeds import derive_seed

# The third key of bucket draws, derive_seed(seed, epoch, BUCKET_SEED_KEY, ...), and of each image's fixed bucket crop.
BUCKET_SEED_KEY = 6007

logger = logging.getLogger(__name__)


def parse_buckets(text):
    """--aspect_ratio_buckets "h,w;h,w;...": the buckets as (height, width) pairs; None when not given."""
    if text is None:
        return None
    buckets = []
    for part in text.replace(" ", "").strip(";").split(";"):
        try:
            height, width = (int(side) for side in part.split(","))
        except ValueError:
            raise UserError(
                f"--aspect_ratio_buckets: {part!r} is not 'height,width' (e.g. '512,512;384,640')"
            ) from None
        if height < 8 or width < 8 or height % 8 or width % 8:
            raise UserError(f"--aspect_ratio_buckets: {height},{width} has a side that is not a multiple of 8")
        buckets.append((height, width))
    if len(set(buckets)) != len(buckets):
        raise UserError(f"--aspect_ratio_buckets {text!r}: a bucket is listed twice")
    return buckets


def parse_size(text, default):
    """--validation_resolution 'height,width' (or one side, for a square) as (height, width); default when not given."""
    if text is None:
        return default, default
    try:
        sides = [int(side) for side in text.replace(" ", "").split(",")]
        height, width = sides if len(sides) == 2 else sides * 2
    except ValueError:
        raise UserError(f"--validation_resolution {text!r}: expected 'height,width', e.g. '640,384'") from None
    if height % 8 or width % 8 or height < 8 or width < 8:
        raise UserError(f"--validation_resolution {text!r}: both sides must be multiples of 8")
    return height, width


def bucket_step(resolution, model_factor):
    """The multiple every generated bucket side is made of: what the VAE and the UNet's downsampling need
    (`model_factor`, 64 for Stable Diffusion), and at least an eighth of the resolution (64 at 512, as kohya's
    default), so the number of buckets stays small."""
    return model_factor * max(1, resolution // 8 // model_factor)


def generate_buckets(resolution, step, max_ratio=4.0):
    """Buckets of at most resolution² pixels with both sides multiples of `step`, no side under half the resolution
    and aspect ratios from 1:max_ratio to max_ratio:1: for each landscape width, the tallest height that fits, and
    each of those turned to portrait too (17 buckets at 512 with step 64). Sorted from tall to wide."""
    shortest = max(resolution // 2 // step * step, step)
    buckets = set()
    for width in range(resolution // step * step, resolution * resolution // shortest + 1, step):
        height = min(resolution * resolution // width // step * step, width // step * step)
        if height >= shortest and width / height <= max_ratio:
            buckets.update({(height, width), (width, height)})
    return sorted(buckets, key=lambda bucket: (bucket[1] / bucket[0], bucket[0]))


def assign_buckets(sizes, buckets, no_upscale, step):
    """The bucket of each image, given its (width, height): the one nearest its aspect ratio (in log ratio). With
    no_upscale only buckets that fit inside the image count, and an image smaller than all of them gets a bucket of
    its own size (cut down to multiples of `step`). Returns the bucket index of every image and the buckets,
    extended with those own sizes."""
    buckets = list(buckets)
    assigned = []
    for width, height in sizes:
        candidates = range(len(buckets))
        if no_upscale:
            candidates = [i for i in candidates if buckets[i][0] <= height and buckets[i][1] <= width]
            if not candidates:
                own = (max(height // step, 1) * step, max(width // step, 1) * step)
                if own not in buckets:
                    buckets.append(own)
                candidates = [buckets.index(own)]
        ratio = math.log(width / height)
        assigned.append(min(candidates, key=lambda i: (abs(math.log(buckets[i][1] / buckets[i][0]) - ratio), i)))
    return assigned, buckets


def cut_into_batches(order, global_batch_size):
    """Rows in order, cut into global batches of (row, weight). The last batch is topped up with rows from the start of
    the order at weight 0, and its own rows weigh more so that a batch's weights always average 1. Padding rather than
    dropping: shapes stay fixed, every row counts exactly once per epoch, and a batch is the same whatever number of
    processes shares it."""
    batches = []
    for start in range(0, len(order), global_batch_size):
        chosen = order[start : start + global_batch_size]
        padding = [order[i % len(order)] for i in range(global_batch_size - len(chosen))]
        weight = global_batch_size / len(chosen)
        batches.append([(row, weight) for row in chosen] + [(row, 0.0) for row in padding])
    return batches


def shuffled_batches(num_rows, global_batch_size, seed, epoch):
    """The epoch's global batches as lists of (row, weight): all rows in an order that depends only on (seed, epoch),
    cut into batches (cut_into_batches). NumPy, so the PyTorch and JAX twins see the same batches."""
    order = np.random.default_rng(derive_seed(seed, epoch)).permutation(num_rows).tolist()
    return cut_into_batches(order, global_batch_size)


def bucket_batches(bucket_of_row, global_batch_size, seed, epoch):
    """The epoch's global batches as lists of (row, weight), every batch from one bucket: each bucket's rows shuffled,
    cut into batches (cut_into_batches: a small bucket still trains, and the number of batches is the same every
    epoch), then the batches shuffled; all a pure function of (seed, epoch)."""
    rows_by_bucket = {}
    for row, bucket in enumerate(bucket_of_row):
        rows_by_bucket.setdefault(int(bucket), []).append(row)
    batches = []
    for bucket, rows in sorted(rows_by_bucket.items()):
        order = np.random.default_rng(derive_seed(seed, epoch, BUCKET_SEED_KEY, bucket)).permutation(rows).tolist()
        batches.extend(cut_into_batches(order, global_batch_size))
    batch_order = np.random.default_rng(derive_seed(seed, epoch, BUCKET_SEED_KEY)).permutation(len(batches))
    return [batches[index] for index in batch_order]


def describe_buckets(bucket_of_row, buckets, global_batch_size):
    """The bucket histogram for the log: images and batches per bucket, largest first."""
    counts = np.bincount(np.asarray(bucket_of_row), minlength=len(buckets))
    lines = [
        f"  {buckets[i][0]}x{buckets[i][1]} (h x w): {counts[i]} images, {math.ceil(counts[i] / global_batch_size)} "
        f"batches"
        for i in np.argsort(-counts, kind="stable")
        if counts[i]
    ]
    return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class BatchShare:
    """This process's rows, start:stop, of a global batch of global_batch_size. Each random draw is made for the whole
    global batch and cut to these rows (as the JAX twin draws over its global arrays), so a sample's draws depend on
    its place in the global batch, and the run on the global batch, not on how many processes share it."""

    start: int
    stop: int
    global_batch_size: int

    @classmethod
    def of_process(cls, process_index, batch_size, num_processes):
        return cls(process_index * batch_size, (process_index + 1) * batch_size, batch_size * num_processes)


def add_crop_arguments(group):
    """The square crop each image trains on (crop_box) and its mirror image, the same flags in both text-to-image
    scripts."""
    group.add_argument(
        "--resolution", type=int, default=512, help="Training images are resized and cropped to this square size."
    )
    group.add_argument(
        "--center_crop", action="store_true", help="Crop the center of each image instead of a random crop."
    )
    group.add_argument("--random_flip", action="store_true", help="Flip images horizontally at random.")


def add_bucket_arguments(group):
    """--use_aspect_ratio_buckets and the buckets, the same flags in both text-to-image scripts."""
    group.add_argument(
        "--use_aspect_ratio_buckets",
        action="store_true",
        help="Batch images by aspect ratio (one bucket per batch) instead of cropping every one to a square.",
    )
    group.add_argument(
        "--aspect_ratio_buckets",
        type=str,
        default=None,
        help="Buckets as 'height,width;...' (implies --use_aspect_ratio_buckets); default: made from --resolution.",
    )
    group.add_argument(
        "--bucket_no_upscale",
        action="store_true",
        help="Never enlarge an image to fit a bucket: an image smaller than every bucket gets one of its own size.",
    )


@dataclasses.dataclass(frozen=True)
class BucketConfig:
    """The bucket flags, as parse_args left them (aspect_ratio_buckets parsed by parse_buckets, or None)."""

    resolution: int
    aspect_ratio_buckets: list | None
    bucket_no_upscale: bool

    @classmethod
    def from_args(cls, args):
        return cls(args.resolution, args.aspect_ratio_buckets, args.bucket_no_upscale)


def setup_buckets(sizes, config, model_factor, global_batch_size):
    """--use_aspect_ratio_buckets: (bucket_of_row, buckets), each image's bucket index and the buckets' (height,
    width), from --aspect_ratio_buckets or generated from --resolution; logs the bucket histogram."""
    step = bucket_step(config.resolution, model_factor)
    if config.aspect_ratio_buckets is not None:
        buckets = config.aspect_ratio_buckets  # sides checked against the model before it loaded (check_model_sizes)
        origin = f"{len(buckets)} from --aspect_ratio_buckets"
    else:
        buckets = generate_buckets(config.resolution, step)
        origin = f"{len(buckets)} generated for --resolution {config.resolution}: sides multiples of {step}, 1:4 to 4:1"
    bucket_of_row, assigned = assign_buckets(sizes, buckets, config.bucket_no_upscale, model_factor)
    if len(assigned) > len(buckets):
        origin += f", {len(assigned) - len(buckets)} more for images smaller than all (--bucket_no_upscale)"
    histogram = describe_buckets(bucket_of_row, assigned, global_batch_size)
    logger.info(f"Aspect-ratio buckets ({origin}):\n{histogram}")
    return bucket_of_row, assigned


def crop_box(image_size, rng, resolution, center_crop, bucket=None, seed=None, row=None):
    """Where the training crop of an image of image_size (width, height) comes from: (resized height, width),
    (top, left) of the crop in the resized image, and the crop's (height, width). The same in both frameworks'
    datasets. Without a bucket, the shorter side goes to `resolution` and `rng` draws a random square crop; in a
    bucket ((height, width), with the run's seed and the image's row) the random crop is drawn once per image, so
    --cache_latents stores exactly what an uncached run trains on."""
    image_width, image_height = image_size
    if bucket is None:
        # The shorter side to --resolution, the longer in proportion (truncated, as torchvision computes it).
        height = width = resolution
        short, long = sorted((image_width, image_height))
        resized_long = int(resolution * long / short)
        if image_width <= image_height:
            resized = (resized_long, resolution)
        else:
            resized = (resolution, resized_long)
        crop_rng = rng
    else:
        # Resized to cover its bucket, then cropped.
        height, width = bucket
        scale = max(height / image_height, width / image_width)
        resized = (max(height, round(image_height * scale)), max(width, round(image_width * scale)))
        crop_rng = np.random.default_rng([seed, BUCKET_SEED_KEY, row])
    if center_crop:
        top, left = int(round((resized[0] - height) / 2.0)), int(round((resized[1] - width) / 2.0))
    else:
        top = int(crop_rng.integers(0, resized[0] - height + 1))
        left = int(crop_rng.integers(0, resized[1] - width + 1))
    return resized, (top, left), (height, width)


def size_conditioning(image_size, box, flipped):
    """SDXL's time_ids (Podell et al. 2023, arXiv:2307.01952, sec. 2.2): the image's original (height, width), the
    crop's top-left corner in the resized image, and the size trained at, for an image of image_size (width, height)
    cropped at `box` (see crop_box). A mirrored image was cropped from the mirrored corner, so its left offset is
    measured from the other side."""
    image_width, image_height = image_size
    resized, (top, left), (height, width) = box
    if flipped:
        left = resized[1] - left - width
    return [image_height, image_width, top, left, height, width]


def center_crop_box(width, height):
    """(top, left, side) of the central square of a width x height image, rounded as torchvision's center_crop
    rounds, so both twins crop the same pixels."""
    side = min(width, height)
    return int(round((height - side) / 2.0)), int(round((width - side) / 2.0)), side


def sdxl_time_ids(width, height, resolution, center_crop, flipped):
    """SDXL's size conditioning of one example (Podell et al. 2023, arXiv:2307.01952, sec. 2.2): the image's original
    (height, width), the top-left corner of the crop taken, in the image scaled so its shorter side is `resolution`
    (without center_crop the whole image is squeezed to the square: no crop), and the size trained at. A mirrored
    image was cropped from the mirrored corner, so its left offset is measured from the other side."""
    top, left = 0, 0
    if center_crop:
        top, left, side = center_crop_box(width, height)
        if flipped:
            left = width - left - side
        top, left = round(top * resolution / side), round(left * resolution / side)
    return [height, width, top, left, resolution, resolution]
