#!/usr/bin/env python
"""The demo `make demo` runs, offline on CPU: a starter pipeline learns colored shapes, then a new word for a concept.

    .venv/bin/python demo/run_demo.py --output_dir demo_output

1. demo/build_starter.py builds (or reuses) the starter pipeline, the shapes dataset and the concept set.
2. `accelerate launch train_text_to_image.py` teaches the starter's fresh UNet to draw "a <color> <shape>".
3. `accelerate launch textual_inversion.py` learns "<thing>" from five pictures of one concept; with --bucket_steps N,
   at the same time, the fine-tuned pipeline trains on for N updates with aspect-ratio buckets on wide and tall
   pictures (the shape off the centre) and is scored at a landscape and a portrait size.
Each step writes a sample grid (prompts x seeds) scored by demo/evaluate.py and a loss curve; summary.json holds the
figures. --snr_gamma and --max_train_steps choose the recipe; --compare_snr runs it with and without Min-SNR and
reports the steps each needs to reach the accuracy thresholds; --compare_buckets trains on the wide and tall pictures
with buckets and with square crops and scores both at the landscape and portrait sizes.
"""

import argparse
import json
import os
import subprocess
import sys
import time

import evaluate
import shapes

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

THRESHOLDS = {"color_accuracy": 0.9, "shape_accuracy": 0.7}
CONCEPT = ("green", "triangle")
# The buckets of the wide-and-tall stage, as --aspect_ratio_buckets takes them (height,width), and the (height, width)
# sizes it is scored at.
BUCKETS = "64,64;48,96;96,48"
SCORED_SIZES = {"landscape": (48, 96), "portrait": (96, 48)}
# The frozen VAE and text encoder encode every image and caption once, before training: the same training, with 31%
# less time per step on the shapes (measured on 2 CPU cores).
CACHES = ["--cache_latents", "--cache_text_embeddings"]
CORES = len(os.sched_getaffinity(0))
# Seconds per update of each stage on 2 idle CPU cores, for the estimate each stage's banner prints (the progress bars
# under it show the time left as it goes): the VAE's 400 steps take two minutes, fine-tuning 0.25 s (see launch), and
# textual inversion, which also runs the text encoder forward and back, 1.9 times that step in a side-by-side
# measurement; with them the default demo adds up to the 11 minutes docs/demo.md reports.
SECONDS_PER_STEP = {"vae": 0.3, "text_to_image": 0.25, "textual_inversion": 0.45}
HALF_THE_CORES = max(CORES // 2, 1)  # for each of two runs side by side


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Offline demo: fine-tune a starter pipeline on shapes, then textual inversion."
    )
    parser.add_argument(
        "--output_dir", type=str, default="demo_output", help="Where the starter, runs, grids and summary go."
    )
    parser.add_argument("--max_train_steps", type=int, default=1500, help="train_text_to_image.py optimizer updates.")
    parser.add_argument("--ti_steps", type=int, default=300, help="textual_inversion.py optimizer updates.")
    parser.add_argument(
        "--vae_steps", type=int, default=400, help="VAE pretraining steps of a new starter (build_starter.py)."
    )
    parser.add_argument(
        "--snr_gamma", type=float, default=5.0, help="Min-SNR gamma for train_text_to_image.py (0: off)."
    )
    parser.add_argument(
        "--compare_snr", action="store_true", help="Train with and without Min-SNR; report steps to the thresholds."
    )
    parser.add_argument(
        "--eval_every", type=int, default=100, help="With --compare_snr: score a checkpoint every this many steps."
    )
    parser.add_argument(
        "--bucket_steps",
        type=int,
        default=0,
        help="Updates of the wide-and-tall stage (aspect-ratio buckets); 0 leaves it out (300 with --compare_buckets).",
    )
    parser.add_argument(
        "--compare_buckets",
        action="store_true",
        help="Train the wide-and-tall stage with buckets and with square crops; score both at both sizes.",
    )
    parser.add_argument("--seeds", type=int, default=4, help="Pictures per prompt when scoring.")
    return parser.parse_args(argv)


def banner(what, steps, seconds_per_step):
    """A stage's title and its estimated time, so that a stage silent for minutes has said what it is doing."""
    minutes = max(round(steps * seconds_per_step / 60), 1)
    print(f"\n===== {what}: about {minutes} min on 2 CPU cores =====\n", flush=True)


def launch(script, args, wait=True, threads=None):
    """Run a training script the way users do; its output streams to this terminal. wait=False returns the running
    process. `threads`: CPU threads for it, by default every core (Accelerate gives a one-process launch one thread,
    and the demo's fine-tuning ran 1.45x faster per step on two: 0.25 against 0.36 s, with the same losses)."""
    command = [
        os.path.join(os.path.dirname(sys.executable), "accelerate"),
        "launch",
        "--num_cpu_threads_per_process",
        str(threads or CORES),
        "--num_processes",
        "1",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        os.path.join(REPO, script),
    ]
    process = subprocess.Popen(command + [str(a) for a in args], env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if wait:
        finish(process)
    return process


def finish(process):
    if process.wait() != 0:
        raise subprocess.CalledProcessError(process.returncode, process.args)


def train_wide_and_tall(t2i, data, output_dir, steps, buckets, wait=True, threads=None):
    """Go on training the fine-tuned pipeline on wide and tall pictures: with aspect-ratio buckets, or (buckets=False)
    resized and cropped to 64x64 squares as without them."""
    args = [
        "--pretrained_model_name_or_path",
        t2i,
        "--train_data_dir",
        data,
        "--resolution",
        64,
        "--train_batch_size",
        16,
        "--max_train_steps",
        steps,
        "--learning_rate",
        3e-4,
        "--lr_scheduler",
        "cosine",
        "--lr_warmup_steps",
        10,
        "--checkpointing_steps",
        steps,
        "--snr_gamma",
        5.0,
        "--seed",
        0,
        "--report_to",
        "none",
        "--output_dir",
        output_dir,
    ]
    # With buckets each image has one crop, so it can be cached. The square arm keeps a new random crop per use, as
    # training without buckets does.
    layout = ["--aspect_ratio_buckets", BUCKETS, *CACHES] if buckets else ["--random_flip"]
    return launch("train_text_to_image.py", args + layout, wait=wait, threads=threads)


def score_sizes(pipeline, seeds, grid_prefix):
    """Color and shape accuracy of the pipeline's pictures at the landscape and the portrait size."""
    scores = {}
    for name, (height, width) in SCORED_SIZES.items():
        argv = ["--pipeline", pipeline, "--seeds", str(seeds), "--height", str(height), "--width", str(width)]
        scores[name] = evaluate.main_scores(argv + ["--grid", f"{grid_prefix}-{name}.png"])
    return scores


def train_shapes(starter, output_dir, steps, snr_gamma, checkpointing_steps):
    banner(f"Fine-tuning the UNet on the shapes: {steps} updates", steps, SECONDS_PER_STEP["text_to_image"])
    # Drawings the run never trains on (another seed), scored every 100 updates: docs/evaluation.md's validation loss.
    held_out = shapes.write_shapes_dataset(output_dir + "_held_out", per_combination=2, seed=100)
    args = [
        "--pretrained_model_name_or_path",
        os.path.join(starter, "pipeline"),
        "--train_data_dir",
        os.path.join(starter, "shapes"),
        "--resolution",
        64,
        "--random_flip",
        # The drawings are 64x64 already, so the center crop changes nothing and lets the VAE run once per image.
        "--center_crop",
        *CACHES,
        "--train_batch_size",
        16,
        "--max_train_steps",
        steps,
        "--learning_rate",
        1e-3,
        "--lr_scheduler",
        "cosine",
        "--lr_warmup_steps",
        20,
        "--checkpointing_steps",
        checkpointing_steps,
        "--seed",
        0,
        "--validation_prompts",
        "a red circle",
        "a blue square",
        "a yellow triangle",
        "--validation_epochs",
        10,
        "--validation_data_dir",
        held_out,
        "--validation_loss_steps",
        100,
        "--output_dir",
        output_dir,
    ]
    launch("train_text_to_image.py", args + (["--snr_gamma", snr_gamma] if snr_gamma else []))


def steps_to_thresholds(pipeline, run_dir, seeds):
    """Score every checkpoint of a run; the first step at which both thresholds hold (None if never)."""
    import torch
    from diffusers import UNet2DConditionModel

    history = []
    for name in sorted(
        (n for n in os.listdir(run_dir) if n.startswith("checkpoint-")), key=lambda n: int(n.split("-")[1])
    ):
        pipeline.unet = UNet2DConditionModel.from_pretrained(os.path.join(run_dir, name, "unet")).to(torch.float32)
        _, color, shape = evaluate.evaluate(pipeline, evaluate.cases(), seeds, 25, 5.0)
        history.append(
            {"step": int(name.split("-")[1]), "color_accuracy": round(color, 4), "shape_accuracy": round(shape, 4)}
        )
        print(f"{run_dir}: {history[-1]}", flush=True)
    reached = [h["step"] for h in history if all(h[k] >= v for k, v in THRESHOLDS.items())]
    return (reached[0] if reached else None), history


def main(argv=None):
    args = parse_args(argv)
    start = time.time()
    starter = os.path.join(args.output_dir, "starter")
    banner(
        f"Starter pipeline: {args.vae_steps} VAE steps (reused if already built)",
        args.vae_steps,
        SECONDS_PER_STEP["vae"],
    )
    subprocess.run(
        [
            sys.executable,
            os.path.join(HERE, "build_starter.py"),
            "--output_dir",
            starter,
            "--vae_steps",
            str(args.vae_steps),
        ],
        check=True,
    )
    summary = {}

    if args.compare_snr:
        from diffusers import StableDiffusionPipeline

        pipeline = StableDiffusionPipeline.from_pretrained(os.path.join(starter, "pipeline"), safety_checker=None)
        pipeline.set_progress_bar_config(disable=True)
        for label, gamma in [("snr_gamma_5", 5.0), ("no_snr", 0.0)]:
            run_dir = os.path.join(args.output_dir, f"compare_{label}")
            if not os.path.exists(os.path.join(run_dir, "model_index.json")):
                train_shapes(starter, run_dir, args.max_train_steps, gamma, args.eval_every)
            reached, history = steps_to_thresholds(pipeline, run_dir, args.seeds)
            summary[label] = {"steps_to_thresholds": reached, "history": history}
        with open(os.path.join(args.output_dir, "compare_snr.json"), "w") as f:
            json.dump(summary, f, indent=2)
        print(json.dumps({k: v["steps_to_thresholds"] for k, v in summary.items()}))
        return

    t2i = os.path.join(args.output_dir, "text_to_image")
    wide_and_tall = shapes.write_wide_and_tall_dataset(os.path.join(args.output_dir, "wide_and_tall_data"))
    if args.compare_buckets:
        if not os.path.exists(os.path.join(t2i, "model_index.json")):
            train_shapes(starter, t2i, args.max_train_steps, args.snr_gamma, max(args.max_train_steps // 2, 1))
        for label, buckets in [("buckets", True), ("square_crops", False)]:
            run_dir = os.path.join(args.output_dir, f"compare_{label}")
            train_wide_and_tall(t2i, wide_and_tall, run_dir, args.bucket_steps or 300, buckets)
            summary[label] = score_sizes(run_dir, args.seeds, os.path.join(run_dir, "samples"))
        summary["before"] = score_sizes(t2i, args.seeds, os.path.join(args.output_dir, "compare_before"))
        with open(os.path.join(args.output_dir, "compare_buckets.json"), "w") as f:
            json.dump(summary, f, indent=2)
        for label, scores in summary.items():
            figures = ", ".join(
                f"{size} color {s['color_accuracy']:.0%} shape {s['shape_accuracy']:.0%}" for size, s in scores.items()
            )
            print(f"{label}: {figures}")
        return

    # Fine-tune the UNet on the shapes.
    train_shapes(starter, t2i, args.max_train_steps, args.snr_gamma, max(args.max_train_steps // 2, 1))
    score = evaluate.main_scores(
        ["--pipeline", t2i, "--seeds", str(args.seeds), "--grid", os.path.join(t2i, "samples.png")]
    )
    summary["text_to_image"] = {**score, "loss_curve": plot_loss(t2i), **validation_curve(t2i)}

    # Meanwhile, go on training the fine-tuned pipeline on wide and tall pictures, with aspect-ratio buckets.
    buckets = os.path.join(args.output_dir, "buckets")
    bucket_run = None
    if args.bucket_steps:
        bucket_run = train_wide_and_tall(
            t2i, wide_and_tall, buckets, args.bucket_steps, buckets=True, wait=False, threads=HALF_THE_CORES
        )

    # Learn a word for the concept, on top of the fine-tuned pipeline.
    ti = os.path.join(args.output_dir, "textual_inversion")
    alongside = f", with {args.bucket_steps} bucket updates alongside" if bucket_run else ""
    banner(
        f"Textual inversion of <thing>: {args.ti_steps} updates{alongside}",
        args.ti_steps,
        SECONDS_PER_STEP["textual_inversion"] * (2 if bucket_run else 1),  # each run has half the cores
    )
    launch(
        "textual_inversion.py",
        [
            "--pretrained_model_name_or_path",
            t2i,
            "--train_data_dir",
            os.path.join(starter, "concept"),
            "--placeholder_token",
            "<thing>",
            "--initializer_token",
            "circle",
            "--num_vectors",
            1,
            "--resolution",
            64,
            "--repeats",
            20,
            "--cache_latents",
            "--train_batch_size",
            8,
            "--max_train_steps",
            args.ti_steps,
            "--learning_rate",
            2e-2,
            "--lr_warmup_steps",
            0,
            "--snr_gamma",
            5.0,
            "--seed",
            0,
            "--checkpointing_steps",
            args.ti_steps,
            "--save_steps",
            args.ti_steps,
            "--validation_prompt",
            "a <thing>",
            "--num_validation_images",
            4,
            "--validation_steps",
            max(args.ti_steps // 2, 1),
            "--output_dir",
            ti,
        ],
        threads=HALF_THE_CORES if bucket_run else None,
    )
    score = evaluate.main_scores(
        [
            "--pipeline",
            t2i,
            "--embeddings",
            os.path.join(ti, "learned_embeds.safetensors"),
            "--token",
            "<thing>",
            "--expect",
            *CONCEPT,
            "--seeds",
            str(2 * args.seeds),
            "--grid",
            os.path.join(ti, "samples.png"),
        ]
    )
    summary["textual_inversion"] = {**score, "concept": " ".join(CONCEPT), "loss_curve": plot_loss(ti)}
    if bucket_run is not None:
        finish(bucket_run)
        summary["buckets"] = score_sizes(buckets, args.seeds, os.path.join(buckets, "samples"))
    summary["seconds"] = round(time.time() - start)
    with open(os.path.join(args.output_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print()
    print(f"Fine-tuned pipeline:   {t2i}  (StableDiffusionPipeline.from_pretrained loads it)")
    t2i_score, ti_score = summary["text_to_image"], summary["textual_inversion"]
    print(f"  samples (prompts x seeds): {t2i_score['grid']}")
    print(f"  color accuracy {t2i_score['color_accuracy']:.0%}, shape accuracy {t2i_score['shape_accuracy']:.0%}")
    print(f"  loss curve: {t2i_score['loss_curve']}")
    first, last = t2i_score["validation_loss"][0], t2i_score["validation_loss"][-1]
    print(
        f"  held-out validation loss: {first[1]:.4f} at step {first[0]}, {last[1]:.4f} at step {last[0]} "
        f"({t2i_score['validation_loss_curve']})"
    )
    embeddings = os.path.join(ti, "learned_embeds.safetensors")
    print(f"Learned word <thing>:  {embeddings}  (pipe.load_textual_inversion loads it)")
    print(f"  samples: {ti_score['grid']}")
    print(
        f"  shows a {' '.join(CONCEPT)}: color {ti_score['color_accuracy']:.0%}, shape {ti_score['shape_accuracy']:.0%}"
    )
    print(f"  loss curve: {ti_score['loss_curve']}")
    if bucket_run is not None:
        print(f"Trained on with aspect-ratio buckets: {buckets}")
        for size, score in summary["buckets"].items():
            figures = f"color {score['color_accuracy']:.0%}, shape {score['shape_accuracy']:.0%}"
            print(f"  {size}: {figures}  ({score['grid']})")
    print(f"Summary: {os.path.join(args.output_dir, 'summary.json')}  ({summary['seconds']} s)")


def plot_loss(run_dir):
    """loss_curve.png from the run's tensorboard log: the raw loss in gray, a moving average in blue."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    points = []
    for root, _, files in os.walk(os.path.join(run_dir, "logs")):
        for name in files:
            if name.startswith("events.out.tfevents"):
                events = EventAccumulator(os.path.join(root, name), size_guidance={"scalars": 0}).Reload()
                if "loss" in events.Tags()["scalars"]:
                    points += [(e.step, e.value) for e in events.Scalars("loss")]
    return draw_curve(sorted(points), os.path.join(run_dir, "loss_curve.png"), "loss", smooth=True)


def validation_curve(run_dir):
    """The held-out validation loss the run wrote (validation_loss.jsonl, one line per evaluation): its (step, loss)
    points and their plot, validation_loss.png."""
    with open(os.path.join(run_dir, "validation_loss.jsonl")) as f:
        points = [(entry["step"], entry["loss"]) for entry in map(json.loads, f)]
    path = draw_curve(points, os.path.join(run_dir, "validation_loss.png"), "held-out validation loss")
    return {"validation_loss": points, "validation_loss_curve": path}


def draw_curve(points, path, label, smooth=False, width=480, height=240):
    """A line plot of (step, value) points, written to path: the values in blue, or with smooth the raw values in
    gray under a moving average in blue."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (width, height), "white")
    pen = ImageDraw.Draw(image)
    if len(points) > 1:
        steps, values = [p[0] for p in points], [p[1] for p in points]
        top, bottom = max(values), min(values)

        def xy(step, value):
            return 40 + (width - 50) * (step - steps[0]) / max(steps[-1] - steps[0], 1), 10 + (height - 40) * (
                top - value
            ) / max(top - bottom, 1e-8)

        line = values
        if smooth:
            window = max(len(values) // 20, 1)
            line = [
                sum(values[max(0, i - window + 1) : i + 1]) / len(values[max(0, i - window + 1) : i + 1])
                for i in range(len(values))
            ]
            pen.line([xy(s, v) for s, v in zip(steps, values, strict=True)], fill=(200, 200, 200))
        pen.line([xy(s, v) for s, v in zip(steps, line, strict=True)], fill=(30, 80, 200), width=2)
        pen.text((4, 4), f"{top:.3f}", fill="black")
        pen.text((4, height - 40), f"{bottom:.3f}", fill="black")
        pen.text((40, height - 20), f"{label} vs step ({steps[0]}..{steps[-1]})", fill="black")
    image.save(path)
    return path


if __name__ == "__main__":
    main()
