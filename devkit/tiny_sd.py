"""Build a tiny Stable Diffusion pipeline and small image-caption datasets, offline, from configs.

The tests (through conftest.py) and `make demo` use this. Nothing here downloads anything: the tokenizer is a
byte-level CLIP BPE vocabulary written below, and every model is randomly initialised from a small config and saved
with `save_pretrained` in the standard diffusers folder layout, exactly as a hub checkpoint is laid out.

    python -m devkit.tiny_sd --output_dir /tmp/tiny      # writes /tmp/tiny/{pipeline,images,...}
"""

import argparse
import json
import os
import tempfile

import numpy as np
from PIL import Image

# Words that get whole-word tokens, so captions tokenize into a few ids and "a", "red", ... exist in the
# vocabulary as ordinary words (textual inversion must refuse them as placeholders).
VOCAB_WORDS = [
    "a",
    "an",
    "the",
    "of",
    "photo",
    "picture",
    "red",
    "green",
    "blue",
    "yellow",
    "white",
    "black",
    "circle",
    "square",
    "triangle",
    "cat",
    "dog",
    "toy",
    "small",
    "big",
    "on",
    "in",
    "with",
    "and",
    "style",
    "painting",
]
COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40)}
SHAPES = ["circle", "square"]


def bytes_to_unicode():
    """CLIP's reversible byte -> printable-character table (the same mapping GPT-2 uses)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars), strict=True))


def write_clip_tokenizer_files(folder, words=VOCAB_WORDS):
    """Write vocab.json and merges.txt for a byte-level BPE that knows every byte plus `words` as whole tokens."""
    symbols = sorted(set(bytes_to_unicode().values()))
    vocab = {}
    for symbol in symbols + [s + "</w>" for s in symbols]:
        vocab[symbol] = len(vocab)
    merges = []
    for word in words:
        # Merge left to right: "red" -> ("r","e") -> ("re","d</w>"); each partial result becomes a token.
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        merged = pieces[0]
        for piece in pieces[1:]:
            rule = f"{merged} {piece}"
            merged = merged + piece
            if rule not in merges:
                merges.append(rule)
            vocab.setdefault(merged, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    return len(vocab)


# The tiny test architecture: 64 px images -> 8x8x4 latents.
TINY = {
    "text": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, projection_dim=32),
    # Four VAE blocks give the SD downsampling factor of 8, so --resolution means the same as on a real model.
    "vae": dict(block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=8),
    "unet": dict(
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=8,
        norm_num_groups=32,  # 32, as in SD: diffusers' Flax UNet hard-codes it
    ),
}

# The same at SD 2.x's structure: OpenCLIP's GELU text encoder and linear projections in the UNet's transformers.
TINY_SD2 = {
    "text": {**TINY["text"], "hidden_act": "gelu"},
    "vae": TINY["vae"],
    "unet": {**TINY["unet"], "use_linear_projection": True},
}


def one_layer_clip_text(width, hidden_act="quick_gelu"):
    """A CLIP text encoder config at a real model's width with one layer: CLIP's 4x wide MLP, 64 channels per head,
    the projection as wide as the encoder."""
    return dict(
        hidden_size=width,
        intermediate_size=4 * width,
        num_hidden_layers=1,
        num_attention_heads=width // 64,
        projection_dim=width,
        hidden_act=hidden_act,
    )


# Stable Diffusion's structure at a reduced size, for the tests that run the UIs' own loaders: ComfyUI tells the model
# family by the UNet's first width (320) and its cross-attention width (768 for SD 1.x, 1024 with linear projections
# for SD 2.x); InvokeAI by the cross-attention of the second layer of the first level (so two layers per level); and
# both build SD's VAE and text encoder with their real shapes, so the VAE is SD's whole VAE and the text encoder keeps
# its real width and vocabulary (build with vocab_size=49408) with one layer. About 180M parameters in all.
SD1_SHAPED = {
    "text": one_layer_clip_text(768),
    "vae": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32),
    "unet": dict(
        block_out_channels=(320, 320),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=8,  # SD 1.x's 8 heads (diffusers' name for the head count)
        norm_num_groups=32,
    ),
}
SD2_SHAPED = {
    "text": one_layer_clip_text(1024, hidden_act="gelu"),
    "vae": SD1_SHAPED["vae"],
    "unet": {**SD1_SHAPED["unet"], "attention_head_dim": 5, "use_linear_projection": True},  # 64 channels per head
}


def build_tiny_pipeline(path, prediction_type="epsilon", seed=0):
    """Save a randomly initialised tiny SD pipeline (64 px images -> 8x8x4 latents) at `path`."""
    return build_pipeline(path, TINY, sample_size=64, prediction_type=prediction_type, seed=seed)


def sd_schedule(prediction_type):
    """The noise schedule of SD 1.x, 2.x and SDXL (scaled linear betas, 1000 steps)."""
    return dict(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        prediction_type=prediction_type,
    )


def build_vae_and_unet(architecture, sample_size, cross_attention_dim, **vae_overrides):
    """A randomly initialised AutoencoderKL and UNet2DConditionModel of the architecture (see TINY) for images of
    sample_size pixels; the UNet reads text states of cross_attention_dim channels."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    levels = len(architecture["vae"]["block_out_channels"])
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        sample_size=sample_size,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        **architecture["vae"],
        **vae_overrides,
    )
    unet = UNet2DConditionModel(
        sample_size=sample_size // 2 ** (levels - 1),
        in_channels=4,
        out_channels=4,
        cross_attention_dim=cross_attention_dim,
        **architecture["unet"],
    )
    return vae, unet


def build_pipeline(path, architecture, sample_size, prediction_type="epsilon", seed=0, vocab_size=None):
    """Save a randomly initialised SD pipeline of the given architecture (see TINY) at `path`, in the standard
    diffusers folder layout. vocab_size pads the text encoder's embedding table (49408 for SD's CLIP)."""
    import torch
    from diffusers import PNDMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from sdtrain.torch.text import write_hub_style_text_encoder

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as token_dir:
        tokens = write_clip_tokenizer_files(token_dir)
        tokenizer = CLIPTokenizer.from_pretrained(token_dir, model_max_length=77)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=max(tokens, vocab_size or 0),
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **architecture["text"],
        )
    )
    vae, unet = build_vae_and_unet(architecture, sample_size, architecture["text"]["hidden_size"])
    scheduler = PNDMScheduler(skip_prk_steps=True, steps_offset=1, **sd_schedule(prediction_type))
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(path, safe_serialization=True)
    # Keys as hub checkpoints have them ('text_model.' prefix), which transformers 4 (the Flax stack) needs.
    write_hub_style_text_encoder(os.path.join(path, "text_encoder"))
    # transformers 5 saves only tokenizer.json; older releases (the Flax stack) read vocab.json + merges.txt.
    write_clip_tokenizer_files(os.path.join(path, "tokenizer"))
    return path


# The tiny architecture at SDXL's structure: two text encoders (CLIP ViT-L's and OpenCLIP bigG's kinds, the second with
# a projection whose output is the pooled text embedding), a UNet with linear projections that reads their
# concatenated hidden states (32 + 32) and, through its "text_time" addition embedding, the pooled embedding and the six
# size numbers (original size, crop offsets, target size), each embedded in 8 channels.
TINY_SDXL = {
    "text": TINY["text"],
    "text_2": {**TINY["text"], "hidden_act": "gelu"},
    "vae": TINY["vae"],
    "unet": {
        **TINY["unet"],
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 8,
        "projection_class_embeddings_input_dim": TINY["text"]["projection_dim"] + 6 * 8,
    },
}


# TINY_SDXL with the second text encoder wider than the first, as SDXL's are (768 and 1280): diffusers' single-file
# loader tells the two apart by width, and reads the first into both where they are equally wide.
TINY_SDXL_TWO_WIDTHS = {**TINY_SDXL, "text_2": {**TINY_SDXL["text_2"], "hidden_size": 48}}  # pooled: still 32 wide


# SDXL's structure at a reduced size, for the UI loader tests (see SD1_SHAPED): ComfyUI tells SDXL by the UNet's first
# width (320), its 2048-channel cross-attention (CLIP ViT-L's 768 + OpenCLIP bigG's 1280), its 2816-channel added
# embedding (bigG's 1280 pooled + 6 size numbers x 256) and the transformer layers per input block; the smallest count
# it knows is Segmind Vega's (none, 1, 2 per level, two blocks each: its SDXL-family class Segmind_Vega). InvokeAI
# reads the cross-attention width of the second level's first block (2048: SDXL). Both text encoders keep their real
# widths (build with vocab_size=49408) and one layer. Every level keeps 320 channels: ComfyUI reads the widths as whole
# multiples of the first (a (320, 64, 64) UNet fails to load there). About 330M parameters in all.
SDXL_SHAPED = {
    "text": SD1_SHAPED["text"],
    "text_2": one_layer_clip_text(1280, hidden_act="gelu"),
    "vae": SD1_SHAPED["vae"],
    "unet": dict(
        block_out_channels=(320, 320, 320),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2),
        attention_head_dim=5,  # 64 channels per head, as SDXL
        norm_num_groups=32,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=1280 + 6 * 256,
    ),
}


# TINY_SDXL's UNet with SDXL's text encoders (768 and 1280 wide, one layer each): textual inversion on it learns rows of
# the widths the UIs' SDXL text encoders load.
SDXL_TEXT_SHAPED = {
    **TINY_SDXL,
    "text": SDXL_SHAPED["text"],
    "text_2": SDXL_SHAPED["text_2"],
    "unet": {
        **TINY_SDXL["unet"],
        "projection_class_embeddings_input_dim": SDXL_SHAPED["text_2"]["projection_dim"] + 6 * 8,
    },
}


def build_tiny_sdxl_pipeline(path, prediction_type="epsilon", seed=0):
    """Save a randomly initialised tiny SDXL pipeline (64 px images -> 8x8x4 latents) at `path`."""
    return build_sdxl_pipeline(path, TINY_SDXL, sample_size=64, prediction_type=prediction_type, seed=seed)


def build_sdxl_pipeline(path, architecture, sample_size, prediction_type="epsilon", seed=0, vocab_size=None):
    """Save a randomly initialised SDXL pipeline of the given architecture (see TINY_SDXL) at `path`, in the layout
    StableDiffusionXLPipeline.save_pretrained writes: tokenizer(_2), text_encoder(_2), unet, vae, scheduler.
    vocab_size pads both text encoders' embedding tables (49408 for SDXL's)."""
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from sdtrain.torch.text import write_hub_style_text_encoder

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as token_dir:
        tokens = write_clip_tokenizer_files(token_dir)
        tokenizer = CLIPTokenizer.from_pretrained(token_dir, model_max_length=77)
        # OpenCLIP pads with "!" (id 0), as SDXL's second tokenizer does.
        tokenizer_2 = CLIPTokenizer.from_pretrained(token_dir, model_max_length=77, pad_token="!")

    def text_config(name):
        ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
        vocab = max(tokens, vocab_size or 0)
        return CLIPTextConfig(vocab_size=vocab, max_position_embeddings=77, **ids, **architecture[name])

    text_encoder = CLIPTextModel(text_config("text"))
    text_encoder_2 = CLIPTextModelWithProjection(text_config("text_2"))
    width = architecture["text"]["hidden_size"] + architecture["text_2"]["hidden_size"]
    # SDXL's VAE: its own scaling factor, and it overflows in fp16, so its pipeline decodes in fp32 (force_upcast).
    vae, unet = build_vae_and_unet(architecture, sample_size, width, scaling_factor=0.13025, force_upcast=True)
    scheduler = EulerDiscreteScheduler(timestep_spacing="leading", steps_offset=1, **sd_schedule(prediction_type))
    pipeline = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
    )
    pipeline.save_pretrained(path, safe_serialization=True)
    for name in ("text_encoder", "text_encoder_2"):
        write_hub_style_text_encoder(os.path.join(path, name))
    write_clip_tokenizer_files(os.path.join(path, "tokenizer"))
    write_clip_tokenizer_files(os.path.join(path, "tokenizer_2"))
    return path


def draw_shape(color, shape, size=64, rng=None):
    """A plain light background with one colored shape at a random position and size."""
    rng = rng or np.random.default_rng(0)
    canvas = np.full((size, size, 3), 235, dtype=np.uint8)
    radius = int(rng.integers(size // 6, size // 3))
    cy, cx = rng.integers(radius, size - radius, size=2)
    yy, xx = np.mgrid[0:size, 0:size]
    if shape == "circle":
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
    else:
        mask = (abs(yy - cy) <= radius) & (abs(xx - cx) <= radius)
    canvas[mask] = COLORS[color]
    return Image.fromarray(canvas)


def write_imagefolder(folder, num_images=8, size=64, caption_lists=False, seed=0):
    """An imagefolder with metadata.jsonl (`file_name`, `text`): the layout --train_data_dir reads. With caption_lists,
    each row lists two captions and the empty one, as datasets that train classifier-free guidance do."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    rows = []
    combos = [(c, s) for c in COLORS for s in SHAPES]
    for i in range(num_images):
        color, shape = combos[i % len(combos)]
        name = f"{i:04d}.png"
        draw_shape(color, shape, size, rng).save(os.path.join(folder, name))
        caption = f"a {color} {shape}"
        rows.append(
            {"file_name": name, "text": [caption, f"a photo of a {color} {shape}", ""] if caption_lists else caption}
        )
    with open(os.path.join(folder, "metadata.jsonl"), "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return folder


# Landscape, portrait and square sizes (width, height) for the bucket tests: 3 wide, 2 tall, 2 square, 1 very wide.
MIXED_SIZES = [(96, 48), (100, 52), (90, 60), (48, 96), (56, 100), (64, 64), (70, 72), (128, 32)]


def write_mixed_imagefolder(folder, sizes=MIXED_SIZES, seed=3):
    """An imagefolder of non-square images (sizes as (width, height)), with tag-style captions ("a red circle, shape,
    flat, plain"): what the aspect-ratio bucket and caption tests train on."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    combos = [(c, s) for c in COLORS for s in SHAPES]
    with open(os.path.join(folder, "metadata.jsonl"), "w") as f:
        for i, (width, height) in enumerate(sizes):
            color, shape = combos[i % len(combos)]
            name = f"{i:04d}.png"
            draw_shape(color, shape, max(width, height), rng).resize((width, height)).save(os.path.join(folder, name))
            f.write(json.dumps({"file_name": name, "text": f"a {color} {shape}, {shape}, {color}, flat, plain"}) + "\n")
    return folder


def write_concept_folder(folder, num_images=4, size=64, color="yellow", shape="circle", seed=2):
    """A few images of one concept (a plain folder, no captions): what textual inversion trains on."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    for i in range(num_images):
        draw_shape(color, shape, size, rng).save(os.path.join(folder, f"concept_{i}.png"))
    return folder


def write_saved_dataset(folder, num_images=6, size=64, seed=1):
    """A folder that `datasets.load_dataset(path)` reads (parquet), with its own column names."""
    import datasets

    rng = np.random.default_rng(seed)
    combos = [(c, s) for c in COLORS for s in SHAPES]
    images, captions = [], []
    for i in range(num_images):
        color, shape = combos[i % len(combos)]
        images.append(draw_shape(color, shape, size, rng))
        captions.append([f"a {color} {shape}", f"the {color} {shape}"])
    table = datasets.Dataset.from_dict(
        {"picture": images, "captions": captions},
        features=datasets.Features(
            {"picture": datasets.Image(), "captions": datasets.Sequence(datasets.Value("string"))}
        ),
    )
    os.makedirs(os.path.join(folder, "data"), exist_ok=True)
    table.to_parquet(os.path.join(folder, "data", "train-00000-of-00001.parquet"))
    return folder


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", required=True, help="Where to write pipeline/ and images/.")
    parser.add_argument("--num_images", type=int, default=16, help="Images in the generated imagefolder.")
    args = parser.parse_args()
    pipeline_dir = os.path.join(args.output_dir, "pipeline")
    if not os.path.exists(os.path.join(pipeline_dir, "model_index.json")):
        build_tiny_pipeline(pipeline_dir)
    write_imagefolder(os.path.join(args.output_dir, "images"), num_images=args.num_images)
    write_concept_folder(os.path.join(args.output_dir, "concept"))
    print(f"tiny pipeline: {pipeline_dir}\nimagefolder:   {os.path.join(args.output_dir, 'images')}")
    print(f"concept set:   {os.path.join(args.output_dir, 'concept')}")


if __name__ == "__main__":
    main()
