"""The demo learns something a person can see: the shape reader is checked on real drawings, then a demo-sized run
(demo/run_demo.py, as `make demo` runs it) must draw what its prompts ask for, textual inversion must learn the
concept, and training on with aspect-ratio buckets on wide and tall drawings must draw them at a landscape and a
portrait size. Takes about 22 minutes on 2 CPU cores; prints the figures."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from demo import shapes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Half the updates of docs/datasets.md's --compare_buckets run, alongside textual inversion; the square-crop arm and its
# lower figures are left to that command.
BUCKET_STAGE = ["--bucket_steps", "150"]


def test_shape_reader_on_real_drawings():
    rng = np.random.default_rng(123)
    cases = [(c, s) for c in shapes.COLORS for s in shapes.SHAPES for _ in range(25)]
    drawings = [(shapes.draw(c, s, rng), c, s) for c, s in cases]
    color = np.mean([shapes.read_color(image) == c for image, c, _ in drawings])
    shape = np.mean([shapes.read_shape(image) == s for image, _, s in drawings])
    print(f"\nshape reader on {len(cases)} drawings: color {color:.1%}, shape {shape:.1%}")
    assert color == 1.0 and shape >= 0.98
    blank = shapes.Image.new("RGB", (64, 64), shapes.BACKGROUND)
    assert shapes.read_color(blank) is None and shapes.read_shape(blank) is None


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "demo", "run_demo.py"), "--output_dir", str(out), *BUCKET_STAGE],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=3600,  # about 22 minutes alone on 2 slow cores; room for a busy machine
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    print("\n" + "\n".join(result.stdout.splitlines()[-10:]))
    # No stage is silent for minutes: each opens with a banner and its estimate, and the VAE's steps show a bar.
    stages = re.findall(
        r"^===== (Starter|Fine-tuning|Textual inversion)[^=]*: about \d+ min on 2 CPU cores =====$",
        result.stdout,
        re.MULTILINE,
    )
    assert stages == ["Starter", "Fine-tuning", "Textual inversion"], result.stdout[:3000]
    assert "VAE pretraining" in result.stderr
    return out, json.load(open(out / "summary.json"))


def test_starter_is_a_usable_base(demo_run):
    """Decoded latents are recognisable pictures, and distinct prompts give clearly distinct text embeddings."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTokenizer

    pipeline = os.path.join(demo_run[0], "starter", "pipeline")
    vae = AutoencoderKL.from_pretrained(pipeline, subfolder="vae").eval()
    rng = np.random.default_rng(7)
    hits = []
    for color in shapes.COLORS:
        for shape in shapes.SHAPES:
            image = shapes.draw(color, shape, rng)
            x = torch.from_numpy(np.asarray(image, np.float32)).permute(2, 0, 1)[None] / 127.5 - 1
            with torch.no_grad():
                y = vae.decode(vae.encode(x).latent_dist.mean).sample[0]
            decoded = shapes.Image.fromarray(((y.permute(1, 2, 0).clamp(-1, 1) + 1) * 127.5).round().byte().numpy())
            hits.append((shapes.read_color(decoded) == color, shapes.read_shape(decoded) == shape))
    color_accuracy, shape_accuracy = np.mean(hits, axis=0)
    print(f"\nVAE round trip: color {color_accuracy:.0%}, shape {shape_accuracy:.0%}")
    assert color_accuracy == 1.0 and shape_accuracy >= 0.9

    tokenizer = CLIPTokenizer.from_pretrained(pipeline, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(pipeline, subfolder="text_encoder").eval()
    ids = tokenizer(
        ["a red circle", "a blue circle", "a red square"], padding="max_length", return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        states = text_encoder(ids)[0]
    # Position 2 holds the color word, 3 the shape word: they differ by most of the states' norm.
    assert (states[0, 2] - states[1, 2]).norm() > 0.5 * states[0, 2].norm()
    assert (states[0, 3] - states[2, 3]).norm() > 0.5 * states[0, 3].norm()


def test_fine_tuned_pipeline_draws_what_prompts_ask(demo_run):
    score = demo_run[1]["text_to_image"]
    accuracy = f"color {score['color_accuracy']:.1%}, shape {score['shape_accuracy']:.1%}"
    print(f"\ntext_to_image: {accuracy} over {score['images']} pictures")
    assert score["color_accuracy"] >= 0.9 and score["shape_accuracy"] >= 0.7
    assert os.path.isfile(score["grid"]) and os.path.isfile(score["loss_curve"])
    # The held-out drawings' validation loss, every 100 updates: it falls as the pipeline learns what it never saw.
    steps, losses = zip(*score["validation_loss"], strict=True)
    print(f"held-out validation loss: {' '.join(f'{step}:{loss:.4f}' for step, loss in score['validation_loss'])}")
    assert list(steps) == list(range(100, 1501, 100)) and os.path.isfile(score["validation_loss_curve"])
    assert losses[-1] < losses[0]


def test_textual_inversion_learns_the_concept(demo_run):
    score = demo_run[1]["textual_inversion"]
    accuracy = f"color {score['color_accuracy']:.1%}, shape {score['shape_accuracy']:.1%}"
    print(f"\ntextual_inversion ({score['concept']}): {accuracy}")
    assert score["color_accuracy"] >= 0.8 and score["shape_accuracy"] >= 0.8


def test_buckets_draw_at_landscape_and_portrait_sizes(demo_run):
    """After training on with aspect-ratio buckets on drawings whose shape sits away from the centre, pictures
    generated at 96x48 and 48x96 meet the square demo's targets."""
    for size, score in demo_run[1]["buckets"].items():
        print(f"\nbuckets, {size}: color {score['color_accuracy']:.1%}, shape {score['shape_accuracy']:.1%}")
        assert score["color_accuracy"] >= 0.9 and score["shape_accuracy"] >= 0.7, size
        assert os.path.isfile(score["grid"])
    assert sorted(demo_run[1]["buckets"]) == ["landscape", "portrait"]
