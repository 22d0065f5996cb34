#!/usr/bin/env python
"""Speed and memory of the four training scripts, launched as users launch them; writes BENCHMARKS.md.

    make benchmark                                   # CPU configs (a), (b) and (d), and (c) when a GPU is present
    .venv/bin/python benchmarks/run_benchmarks.py --configs small --output BENCHMARKS.md
    .venv/bin/python benchmarks/run_benchmarks.py --plan_only        # each row's command, as JSON lines; runs nothing
    .venv/bin/python benchmarks/run_benchmarks.py --step_memory_only  # only the step-memory section (step_memory.py)
    .venv/bin/python benchmarks/run_benchmarks.py --lora_only --configs small sdxl  # LoRA rows + their full runs

Each run trains for (1 + --windows) windows of --logging_steps updates. The scripts log images/s and step time per
window (those are the only steps that wait for the device); the first window holds start-up, compilation and cache
building and is left out. Peak memory is the run's maximum resident set size on CPU (the launcher's children
included) and torch.cuda.max_memory_allocated on GPU. Model FLOPs utilisation (GPU only) counts the UNet's forward
and backward FLOPs per image, measured with torch.utils.flop_counter, against the GPU's dense bf16 peak.

Pipelines are random-initialised from configs and saved in the diffusers folder layout: nothing is downloaded.

Configs (b) and (d) also train a LoRA (`--rank 16`, the same command otherwise), uncached and cached, beside their
full fine-tune, and (c) beside its batch-16 cached run and its batch-1 memory row. A script without `--rank` (the
flag is new) gets those rows listed as not measured. The last section, from benchmarks/step_memory.py, is the memory
of one training step of the real SD 1.5 and SDXL UNets, LoRA against the full fine-tune.
"""

import argparse
import datetime
import functools
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile

import step_memory  # beside this script, whose folder Python puts first on sys.path

from devkit import tiny_sd
from devkit.running_launch import free_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (b): SD's shape at a fifth of its UNet width and a quarter of its VAE width.
SMALL = {
    "text": dict(
        hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4, projection_dim=256
    ),
    "vae": dict(block_out_channels=(32, 64, 128, 128), layers_per_block=2, norm_num_groups=32),
    "unet": dict(
        block_out_channels=(64, 128, 256, 256),
        layers_per_block=2,
        attention_head_dim=8,
        norm_num_groups=32,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    ),
}
# (c): the Stable Diffusion 1.5 architecture (CLIP ViT-L/14 text encoder, 860M-parameter UNet, 84M-parameter VAE).
SD15 = {
    "text": dict(
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        projection_dim=768,
        hidden_act="quick_gelu",
    ),
    "vae": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32),
    "unet": dict(
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        attention_head_dim=8,
        norm_num_groups=32,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    ),
}
CONFIGS = {
    # name: architecture, resolution, device, batch sizes, mixed precision, whether the Flax twins run, whether the
    # recipes (each loss and optimizer) get their own rows
    "tiny": dict(
        label="(a) tiny test pipeline",
        architecture=tiny_sd.TINY,
        resolution=64,
        device="cpu",
        batches=[8],
        precision="no",
        flax=True,
    ),
    "small": dict(
        label="(b) small SD-shaped pipeline",
        architecture=SMALL,
        resolution=256,
        device="cpu",
        batches=[4],
        precision="no",
        flax=True,
        recipes=True,
        lora=True,
    ),
    # SDXL's structure (two text encoders, the pooled embedding and size conditioning) at the tiny size; SDXL is in
    # train_text_to_image.py only so far, so it has no textual inversion or Flax rows.
    "sdxl": dict(
        label="(d) tiny SDXL pipeline",
        architecture=tiny_sd.TINY_SDXL,
        resolution=64,
        device="cpu",
        batches=[8],
        precision="no",
        flax=False,
        textual_inversion=False,
        lora=True,
    ),
    "sd15": dict(
        label="(c) SD 1.5 architecture",
        architecture=SD15,
        resolution=512,
        device="cuda",
        batches=[8, 16, 32],
        precision="bf16",
        flax=False,
        recipes=True,
        lora=True,
    ),
}
# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets, by a substring of the device name.
GPU_PEAKS = [
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("A10G", 70e12),
]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Benchmark the training scripts and write BENCHMARKS.md.")
    parser.add_argument(
        "--configs",
        nargs="+",
        default=["tiny", "small", "sd15", "sdxl"],
        choices=sorted(CONFIGS),
        help="Configurations to run.",
    )
    parser.add_argument("--logging_steps", type=int, default=4, help="Updates per measured window.")
    parser.add_argument("--windows", type=int, default=5, help="Measured windows per run, after one warm-up window.")
    parser.add_argument(
        "--work_dir",
        type=str,
        default=os.path.join(tempfile.gettempdir(), "sd-benchmarks"),
        help="Where pipelines, data and run outputs go (pipelines are reused).",
    )
    parser.add_argument(
        "--output", type=str, default=os.path.join(REPO, "BENCHMARKS.md"), help="The Markdown report to write."
    )
    parser.add_argument(
        "--image_check_count", type=int, default=2000, help="Images per format for the data-check figure (0: skip)."
    )
    parser.add_argument(
        "--recipes_only",
        action="store_true",
        help="Measure only the recipe rows (and their cached baseline); replace the recipe section of --output.",
    )
    parser.add_argument(
        "--lora_only",
        action="store_true",
        help="Measure only the LoRA rows and the full fine-tune rows they compare with; write them as the LoRA "
        "section of --output (a full run has them in its main table).",
    )
    parser.add_argument(
        "--plan_only",
        action="store_true",
        help="Print each planned row and its command as a JSON line, and exit: nothing is built, run or written.",
    )
    parser.add_argument(
        "--step_memory",
        nargs="*",
        default=["sd15", "sdxl"],
        choices=sorted(step_memory.MODELS),
        help="UNets whose one-step memory (LoRA and full fine-tune, CPU) is measured; none: skip that section.",
    )
    parser.add_argument(
        "--step_memory_only",
        action="store_true",
        help="Measure only the step-memory rows; replace that section of --output.",
    )
    parser.add_argument(
        "--flax_python",
        type=str,
        default=os.path.join(REPO, ".venv-flax", "bin", "python"),
        help="Python of the JAX environment (the Flax rows are skipped without it).",
    )
    return parser.parse_args(argv)


def gpu_name():
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def machine_description():
    import torch

    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        names = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")]
        cpu = names[0] if names else cpu
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = gpu_name() or "none"
    system = f"{platform.system()} {platform.release()}"
    return f"{cpu}, {os.cpu_count()} cores, {memory:.0f} GiB RAM; GPU: {gpu}; torch {torch.__version__}, {system}"


def prepare_assets(name, config, work_dir):
    """The pipeline, a 32-image captioned imagefolder, the same with mixed aspect ratios (for the buckets) and a
    4-image concept folder for one configuration."""
    folder = os.path.join(work_dir, name)
    pipeline = os.path.join(folder, "pipeline")
    if not os.path.exists(os.path.join(pipeline, "model_index.json")):
        vocab = 49408 if config["architecture"] is SD15 else None
        if config["architecture"] is tiny_sd.TINY_SDXL:
            tiny_sd.build_tiny_sdxl_pipeline(pipeline + ".partial")
        else:
            tiny_sd.build_pipeline(
                pipeline + ".partial", config["architecture"], sample_size=config["resolution"], vocab_size=vocab
            )
        os.replace(pipeline + ".partial", pipeline)
    images = tiny_sd.write_imagefolder(os.path.join(folder, "images"), num_images=32, size=config["resolution"])
    side = config["resolution"]
    shapes = [(2 * side, side), (side, 2 * side), (side, side), (3 * side // 2, side)] * 8  # (width, height)
    mixed = tiny_sd.write_mixed_imagefolder(os.path.join(folder, "mixed"), sizes=shapes)
    concept = tiny_sd.write_concept_folder(os.path.join(folder, "concept"), num_images=4, size=config["resolution"])
    return pipeline, images, mixed, concept


def model_flops_per_image(architecture, resolution):
    """(UNet forward + backward, VAE encoder forward) FLOPs for one image, counted by torch's FLOP counter on the
    meta device: shapes only, no weights, so the SD 1.5 figure needs no GPU."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    levels = len(architecture["vae"]["block_out_channels"])
    # SDXL's UNet reads both text encoders' states side by side, and the pooled embedding and six size numbers.
    width = architecture["text"]["hidden_size"] + architecture.get("text_2", {}).get("hidden_size", 0)
    with torch.device("meta"):
        vae = AutoencoderKL(
            latent_channels=4,
            down_block_types=("DownEncoderBlock2D",) * levels,
            up_block_types=("UpDecoderBlock2D",) * levels,
            **architecture["vae"],
        )
        unet = UNet2DConditionModel(cross_attention_dim=width, **architecture["unet"])
        pixels = torch.zeros(1, 3, resolution, resolution)
        latents = torch.zeros(1, 4, resolution // 2 ** (levels - 1), resolution // 2 ** (levels - 1))
        context = torch.zeros(1, 77, width)
        timesteps = torch.tensor([500])
        added = None
        if "text_2" in architecture:
            added = {
                "text_embeds": torch.zeros(1, architecture["text_2"]["projection_dim"]),
                "time_ids": torch.zeros(1, 6),
            }
    with FlopCounterMode(display=False) as counter:
        unet(latents, timesteps, context, added_cond_kwargs=added).sample.sum().backward()
    unet_flops = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter:
        vae.encode(pixels)
    return unet_flops, counter.get_total_flops()


def run(command, log_path, env):
    """Run a command to completion; returns (exit status, output, peak RSS in GiB over it and its descendants)."""
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
    return process.returncode, open(log_path).read(), usage.ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux


LOG_LINE = re.compile(r"step (\d+): (.*)")


def window_logs(output):
    """The scripts' per-window log lines, as {step: {key: value}}."""
    found = {}
    for step, fields in LOG_LINE.findall(output):
        found[int(step)] = {k: float(v) for k, v in (pair.split("=") for pair in fields.split(", "))}
    return found


def measure(row, command, args, env):
    """Run one configuration and fill the row with steady-state figures (windows after the first)."""
    # The log lies beside the output folder: the scripts write only into a folder that is empty or a run's.
    os.makedirs(os.path.dirname(row["output_dir"]), exist_ok=True)
    status, output, rss = run(command, row["output_dir"] + ".log", env)
    row["compiled_shapes"] = output.count("Compiling the train step for")  # the Flax twin logs each compilation
    if status != 0:
        row["error"] = output.strip().splitlines()[-1][:200] if output.strip() else f"exit status {status}"
        print(f"  FAILED: {row['error']}", flush=True)
        return row
    logs = window_logs(output)
    steady = [logs[step] for step in sorted(logs) if step > args.logging_steps]
    if not steady:
        row["error"] = "no log lines after the warm-up window"
        return row
    step_time = statistics.median(entry["step_time"] for entry in steady)  # the median: robust to a stray slow window
    row.update(step_time=step_time, images_per_second=row["images_per_update"] / step_time, peak_rss_gib=rss)
    if steady[-1].get("peak_memory_gib") is not None:
        row["peak_gpu_gib"] = max(entry["peak_memory_gib"] for entry in steady)
    print(f"  {row['images_per_second']:.2f} images/s, {step_time:.3f} s/step, peak RSS {rss:.2f} GiB", flush=True)
    return row


T2I_VARIANTS = [
    ([], "VAE + text encoder in the loop"),
    (["--cache_latents"], "--cache_latents"),
    (["--cache_latents", "--cache_text_embeddings"], "--cache_latents --cache_text_embeddings"),
]
TI_VARIANTS = [([], "VAE in the loop"), (["--cache_latents"], "--cache_latents")]
# Each recipe over the cached t2i run (AdamW + L2), which keeps the VAE and text encoder out of the step so the
# loss's and optimizer's own cost shows.
RECIPE_VARIANTS = [
    ["--loss_type", "huber"],
    ["--loss_type", "smooth_l1"],
    ["--loss_type", "l1"],
    ["--debiased_estimation_loss"],
    ["--timestep_sampling", "logit_normal"],
    ["--optimizer", "adafactor"],
    ["--optimizer", "lion"],
    ["--optimizer", "prodigy"],
    ["--optimizer", "schedule_free_adamw"],
]
GPU_RECIPE_VARIANTS = [["--optimizer", "adamw_8bit"]]  # bitsandbytes needs CUDA
# The cached AdamW + L2 run once more, after the recipes: the baseline is the mean of its two runs, and their spread
# shows how far this machine's noise reaches.
BASELINE_AGAIN = "(none: AdamW + L2, measured again)"
RECIPE_PREFIX = "recipe: "  # the variant of a recipe row, which goes to the recipe table
# Uncached, like the first t2i row, on 2:1, 1:2, 1:1 and 3:2 images: each bucket holds at most resolution² pixels.
BUCKETS_VARIANT = (["--use_aspect_ratio_buckets"], "--use_aspect_ratio_buckets, mixed aspect ratios")
# A LoRA beside the full fine-tune (configs with lora=True): the same command with --rank 16 added (the default
# modules, the attention projections), uncached and with both caches.
LORA_FLAGS = ["--rank", "16"]
LORA_MARK = f"{' '.join(LORA_FLAGS)}, "  # in a LoRA row's variant, before its full fine-tune's
LORA_VARIANTS = [(flags + LORA_FLAGS, LORA_MARK + variant) for flags, variant in T2I_VARIANTS[::2]]
LORA_SECTION = "## LoRA beside the full fine-tune"


def is_lora(variant):
    return LORA_MARK in variant


# The variant of a scaling row: two processes (torchrun / two JAX processes with a coordinator) share the global batch.
TWO_PROCESSES = "2 processes x half the batch, "


def plan(name, config, args, pipeline, images, mixed, concept, flax_ok):
    """(row, command) pairs for one configuration."""
    if config["device"] == "cpu":
        batch = config["batches"][0]
        jobs = [("train_text_to_image.py", batch, flags, variant) for flags, variant in T2I_VARIANTS]
        jobs.append(("train_text_to_image.py", batch, *BUCKETS_VARIANT))
        if config.get("lora"):
            jobs += [("train_text_to_image.py", batch, flags, variant) for flags, variant in LORA_VARIANTS]
        if config.get("textual_inversion", True):
            jobs += [("textual_inversion.py", batch, flags, variant) for flags, variant in TI_VARIANTS]
        if config["flax"] and flax_ok:
            jobs += [
                (script, batch, [], "JAX, VAE in the step")
                for script in ["train_text_to_image_flax.py", "textual_inversion_flax.py"]
            ]
            jobs.append(("train_text_to_image_flax.py", batch, BUCKETS_VARIANT[0], "JAX, " + BUCKETS_VARIANT[1]))
            if config.get("lora"):
                lora_variant = f"JAX, {LORA_MARK}VAE in the step"
                jobs.append(("train_text_to_image_flax.py", batch, LORA_FLAGS, lora_variant))
        # Scaling: the same global batch (the same run, docs/distributed.md) shared by two processes of a core each.
        jobs.append(("train_text_to_image.py", batch, [], TWO_PROCESSES + T2I_VARIANTS[0][1]))
        if config["flax"] and flax_ok:
            jobs.append(("train_text_to_image_flax.py", batch, [], "JAX, " + TWO_PROCESSES + "VAE in the step"))
    else:
        cached, variant = T2I_VARIANTS[2]
        jobs = [("train_text_to_image.py", 16, *T2I_VARIANTS[0])]
        for batch in config["batches"]:
            jobs += [
                ("train_text_to_image.py", batch, cached, variant),
                (
                    "train_text_to_image.py",
                    batch,
                    cached + ["--gradient_checkpointing"],
                    variant + " --gradient_checkpointing",
                ),
            ]
        memory = ["--gradient_checkpointing", "--use_8bit_adam"]
        jobs.append(("train_text_to_image.py", 1, cached + memory, variant + " " + " ".join(memory)))
        if config.get("lora"):  # at SD 1.5's scale: beside the batch-16 cached run, and beside the memory row
            for batch, flags, row_variant in [(16, cached, variant), (1, cached + memory, jobs[-1][3])]:
                jobs.append(("train_text_to_image.py", batch, flags + LORA_FLAGS, LORA_MARK + row_variant))
        jobs += [("textual_inversion.py", 4, flags, variant) for flags, variant in TI_VARIANTS]
    if config.get("recipes"):
        cached, variant = T2I_VARIANTS[2]
        batch = config["batches"][0] if config["device"] == "cpu" else 16
        recipes = RECIPE_VARIANTS + (GPU_RECIPE_VARIANTS if config["device"] == "cuda" else [])
        if args.recipes_only:  # only the recipes, after the cached run of the main table they compare with
            jobs = [("train_text_to_image.py", batch, cached, variant)]
        jobs += [
            ("train_text_to_image.py", batch, cached + flags, RECIPE_PREFIX + " ".join(flags)) for flags in recipes
        ]
        jobs.append(("train_text_to_image.py", batch, cached, RECIPE_PREFIX + BASELINE_AGAIN))
    elif args.recipes_only:
        jobs = []
    if args.lora_only:  # the LoRA rows, each after the full fine-tune row it compares with
        full = {
            (script, batch, variant.replace(LORA_MARK, "")) for script, batch, _, variant in jobs if is_lora(variant)
        }
        jobs = [job for job in jobs if is_lora(job[3]) or (job[0], job[1], job[3]) in full]
        jobs.sort(key=lambda job: (job[0], job[1], job[3].replace(LORA_MARK, ""), is_lora(job[3])))
    steps = args.logging_steps * (1 + args.windows)
    runs = []
    for script, batch, flags, variant in jobs:
        row = dict(
            config=config["label"],
            script=script,
            variant=variant,
            device=config["device"],
            batch=batch,
            resolution=config["resolution"],
            images_per_update=batch,
        )
        processes = 2 if TWO_PROCESSES in variant else 1
        row["output_dir"] = os.path.join(
            args.work_dir, name, "runs", f"{script[:-3]}-b{batch}-" + ("-".join(f.strip("-") for f in flags) or "plain")
        )
        row["output_dir"] += "-2processes" if processes == 2 else ""
        common = [
            "--pretrained_model_name_or_path",
            pipeline,
            "--resolution",
            str(config["resolution"]),
            "--train_batch_size",
            str(batch // processes),
            "--max_train_steps",
            str(steps),
            "--logging_steps",
            str(args.logging_steps),
            "--checkpointing_steps",
            "100000",
            "--seed",
            "0",
            "--output_dir",
            row["output_dir"],
            "--lr_warmup_steps",
            "0",
        ]
        if script.startswith("train_text_to_image"):
            data = mixed if "--use_aspect_ratio_buckets" in flags else images
            common += ["--train_data_dir", data, "--center_crop", "--random_flip"]
        else:
            common += [
                "--train_data_dir",
                concept,
                "--placeholder_token",
                "<thing>",
                "--initializer_token",
                "circle",
                "--save_steps",
                "100000",
                "--repeats",
                "100",
            ]
        if script.endswith("_flax.py") and processes == 2:
            address = f"--coordinator_address 127.0.0.1:{free_port()} --num_processes 2 --process_id".split()
            first, second = ([args.flax_python, script, *common, *flags, *address, str(i)] for i in range(2))
            # The second process's output is dropped; the first logs the steps. The exit status is the first's.
            script_line = f"{shlex.join(second)} > /dev/null 2>&1 & {shlex.join(first)}; status=$?; wait; exit $status"
            runs.append((row, ["env", "OMP_NUM_THREADS=1", "bash", "-c", script_line]))
            continue
        if script.endswith("_flax.py"):
            command = [args.flax_python, script] + common
        elif processes == 2:
            torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
            launcher = ["env", "ACCELERATE_USE_CPU=true", "OMP_NUM_THREADS=1", torchrun, "--nproc_per_node", "2"]
            command = [*launcher, "--master_port", free_port(), script, *common, "--report_to", "none"]
            command += ["--mixed_precision", config["precision"]]
        else:
            command = (
                [
                    os.path.join(os.path.dirname(sys.executable), "accelerate"),
                    "launch",
                    "--config_file",
                    args.accelerate_config[config["device"]],
                    script,
                ]
                + common
                + ["--report_to", "none", "--mixed_precision", config["precision"]]
            )
        runs.append((row, command + flags))
    return runs


def memory_text(row):
    return f"{row['peak_gpu_gib']:.1f} GiB (GPU)" if "peak_gpu_gib" in row else f"{row['peak_rss_gib']:.2f} GiB (RSS)"


def format_recipe_table(rows):
    """The recipe rows: seconds per step against the cached AdamW + L2 run of the same configuration and batch."""
    baseline_variants = (T2I_VARIANTS[2][1], RECIPE_PREFIX + BASELINE_AGAIN)
    runs = {}
    for r in rows:
        if r["script"] == "train_text_to_image.py" and r["variant"] in baseline_variants:
            runs.setdefault((r["config"], r["batch"]), []).append(r.get("step_time"))
    baselines = {key: statistics.mean(times) for key, times in runs.items() if None not in times}
    header = ["configuration", "recipe (over the cached AdamW + L2 run)", "batch", "s/step"]
    header += ["vs AdamW + L2 (mean of 2)", "memory"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        if not r["variant"].startswith(RECIPE_PREFIX):
            continue
        base = baselines.get((r["config"], r["batch"]))
        if "step_time" in r:
            figures = [f"{r['step_time']:.3f}", f"{r['step_time'] / base:.2f}x" if base else "-", memory_text(r)]
        else:
            figures = [r.get("error", "not measured"), "", ""]
        recipe = r["variant"].removeprefix(RECIPE_PREFIX)
        recipe = recipe if recipe == BASELINE_AGAIN else f"`{recipe}`"
        lines.append("| " + " | ".join([r["config"], recipe, str(r["batch"])] + figures) + " |")
    return "\n".join(lines)


def format_table(rows):
    header = [
        "configuration",
        "script",
        "variant",
        "device",
        "batch",
        "px",
        "images/s",
        "s/step",
        "peak memory",
        "MFU",
        "vs uncached square",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def is_baseline(variant):
        """The uncached square run of a script: "... in the loop" (PyTorch) or "... in the step" (JAX)."""
        one_process = TWO_PROCESSES not in variant
        full = not is_lora(variant)  # a LoRA row compares with the full fine-tune
        return (
            ("in the loop" in variant or "in the step" in variant)
            and "checkpointing" not in variant
            and one_process
            and full
        )

    baselines = {
        (r["config"], r["script"], r["batch"]): r.get("images_per_second") for r in rows if is_baseline(r["variant"])
    }
    for r in rows:
        if r["variant"].startswith(RECIPE_PREFIX):
            continue  # in the recipe table
        if "error" in r:
            figures = [r["error"]] + [""] * 4
        elif "images_per_second" not in r:
            figures = ["not measured"] + [""] * 4
        else:
            memory = memory_text(r)
            mfu = f"{100 * r['mfu']:.1f}%" if "mfu" in r else "-"
            base = baselines.get((r["config"], r["script"], r["batch"]))
            speedup = f"{r['images_per_second'] / base:.2f}x" if base and not is_baseline(r["variant"]) else "-"
            figures = [f"{r['images_per_second']:.2f}", f"{r['step_time']:.3f}", memory, mfu, speedup]
        lines.append(
            "| "
            + " | ".join(
                [r["config"], f"`{r['script']}`", r["variant"], r["device"], str(r["batch"]), str(r["resolution"])]
                + figures
            )
            + " |"
        )
    return "\n".join(lines)


def target_lines(rows):
    """The issue's targets, checked against the measured rows."""

    def find(config, script, variant, batch=None):
        return [
            r
            for r in rows
            if r["config"].startswith(config)
            and r["script"] == script
            and r["variant"] == variant
            and (batch is None or r["batch"] == batch)
            and "images_per_second" in r
        ]

    lines = []
    plain, cached = (
        find("(b)", "train_text_to_image.py", T2I_VARIANTS[0][1]),
        find("(b)", "train_text_to_image.py", "--cache_latents"),
    )
    if plain and cached:
        ratio = cached[0]["images_per_second"] / plain[0]["images_per_second"]
        lines.append(
            f"CPU (b), `train_text_to_image.py --cache_latents`: {ratio:.2f}x the images/s without it "
            f"(target: at least 1.5x; {'met' if ratio >= 1.5 else 'not met'})."
        )
    gpu_cached = [
        r
        for r in rows
        if r["config"].startswith("(c)")
        and r["script"] == "train_text_to_image.py"
        and "cache_latents" in r["variant"]
        and "use_8bit_adam" not in r["variant"]
        and not is_lora(r["variant"])
        and r["batch"] >= 16
        and "images_per_second" in r
    ]
    if gpu_cached:
        best = max(gpu_cached, key=lambda r: r["images_per_second"])
        lines.append(
            f"GPU (c), cached latents, batch >= 16: {best['images_per_second']:.1f} images/s "
            f"at batch {best['batch']} ({best['variant']}; "
            f"target 110, stretch 165: {'met' if best['images_per_second'] >= 110 else 'not met'})."
        )
    ti = find("(c)", "textual_inversion.py", "--cache_latents", 4)
    if ti:
        minutes = 3000 * ti[0]["step_time"] / 60
        lines.append(
            f"GPU (c), textual inversion 3000 steps x batch 4: {minutes:.1f} min at the measured step time "
            f"(target: under 3; {'met' if minutes < 3 else 'not met'})."
        )
    memory = [
        r
        for r in rows
        if r["config"].startswith("(c)")
        and "use_8bit_adam" in r["variant"]
        and not is_lora(r["variant"])
        and "peak_gpu_gib" in r
    ]
    if memory:
        gb = memory[0]["peak_gpu_gib"] * 2**30 / 1e9
        lines.append(
            f"GPU (c), batch 1 + gradient checkpointing + 8-bit Adam + cached latents: {gb:.1f} GB peak "
            f"(target: at most 10; {'met' if gb <= 10 else 'not met'})."
        )
    if not any(line.startswith("GPU") for line in lines):
        lines.append(
            "GPU targets (110 images/s per H100, textual inversion under 3 minutes, 10 GB at batch 1): not measured."
        )
    return lines


def image_check_rates(work_dir, count):
    """Images per second the scripts' start-up data check (verify_image on a thread pool) gets through: 512 px JPEG
    and PNG files of a photo-like gradient with noise, written once into work_dir."""
    import time

    import numpy as np
    from PIL import Image

    sys.path.insert(0, REPO)  # the scripts' own package, found beside them
    from sdtrain.images import inspect_images, verify_image

    rates = {}
    rng = np.random.default_rng(0)
    picture = (rng.random((512, 512, 3)) * 40 + np.linspace(0, 200, 512)[None, :, None]).astype(np.uint8)
    for extension in ["jpg", "png"]:
        folder = os.path.join(work_dir, f"image-check-{extension}")
        os.makedirs(folder, exist_ok=True)
        paths = [os.path.join(folder, f"{index:06d}.{extension}") for index in range(count)]
        for index, path in enumerate(paths):
            if not os.path.exists(path):
                Image.fromarray(np.roll(picture, index, axis=1)).save(path, quality=90)
        started = time.perf_counter()
        check = functools.partial(lambda paths, index: verify_image(paths[index], paths[index]), paths)
        _, problems = inspect_images(check, range(count))
        assert not problems, problems[:3]
        rates[extension] = count / (time.perf_counter() - started)
    return rates


def print_plan(args, flax_ok):
    """--plan_only: every row of the chosen configurations and the command that measures it, one JSON object a line,
    with placeholders for the pipeline and data folders."""
    placeholders = ("<pipeline>", "<images>", "<mixed>", "<concept>")
    for name in args.configs:
        for row, command in plan(name, CONFIGS[name], args, *placeholders, flax_ok):
            print(
                json.dumps({key: row[key] for key in ("config", "script", "variant", "batch")} | {"command": command})
            )
    for model in [] if args.lora_only or args.recipes_only else args.step_memory:
        for method in step_memory.METHODS:
            print(json.dumps({"step_memory": model, "method": method}))


def replace_section(text, title, section):
    """text with its section under the heading `title` (up to the next "## " heading) replaced by section, or with
    section appended."""
    head, found, rest = text.partition("\n" + title + "\n")
    tail = "\n## " + rest.split("\n## ", 1)[1] if found and "\n## " in rest else ""
    return head.rstrip("\n") + "\n\n" + section.rstrip("\n") + "\n" + tail


def measure_step_memory(models):
    """benchmarks/step_memory.py's rows for these UNets: LoRA first, then the full fine-tune that needs four times the
    memory or more; SDXL's last, as the largest."""
    import time

    started = time.perf_counter()
    rows = []
    for model in models:
        counts = step_memory.parameter_counts(model)
        for method in step_memory.METHODS:
            print(f"-- step memory: {model}, {step_memory.METHODS[method]}", flush=True)
            rows.append(step_memory.measure(model, method, counts=counts))
    return rows, time.perf_counter() - started


def main(argv=None):
    args = parse_args(argv)
    flax_ok = os.path.exists(args.flax_python)
    args.accelerate_config = {
        device: os.path.join(args.work_dir, f"accelerate-{device}.yaml") for device in ["cpu", "cuda"]
    }
    if args.plan_only:
        print_plan(args, flax_ok)
        return []
    today = datetime.date.today().isoformat()
    if args.step_memory_only:
        step_rows, seconds = measure_step_memory(args.step_memory)
        text = open(args.output).read() if os.path.exists(args.output) else "# Benchmarks\n"
        memory_section = step_memory.section(step_rows, seconds, today, machine_description())
        with open(args.output, "w") as f:
            f.write(replace_section(text, step_memory.SECTION_TITLE, memory_section))
        print(f"Wrote the step-memory section of {args.output}")
        return step_rows
    os.makedirs(args.work_dir, exist_ok=True)
    gpu = gpu_name()
    from accelerate.utils import write_basic_config

    for device, path in args.accelerate_config.items():
        if os.path.exists(path):
            os.remove(path)  # write_basic_config never overwrites
        write_basic_config(mixed_precision="no", save_location=path)
        if device == "cpu":  # a CPU run even where a GPU exists
            config = json.load(open(path))
            config.update(use_cpu=True, distributed_type="NO", num_processes=1)
            json.dump(config, open(path, "w"))
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
    }
    rows, notes = [], []
    for name in args.configs:
        config = CONFIGS[name]
        unet_flops, vae_flops = model_flops_per_image(config["architecture"], config["resolution"])
        notes.append(
            f"{config['label']}, per {config['resolution']} px image: "
            f"UNet forward + backward {unet_flops / 1e12:.4g} TFLOPs, "
            f"VAE encoder {vae_flops / 1e12:.4g} TFLOPs (torch.utils.flop_counter)."
        )
        if config["device"] == "cuda" and gpu is None:
            placeholders = ("<pipeline>", "<images>", "<mixed>", "<concept>")
            rows += [row for row, _ in plan(name, config, args, *placeholders, flax_ok)]
            notes.append(f"{config['label']}: not measured, no GPU on this machine.")
            continue
        print(f"== {config['label']}: preparing the pipeline and data", flush=True)
        pipeline, images, mixed, concept = prepare_assets(name, config, args.work_dir)
        peak = (
            next((value for key, value in GPU_PEAKS if gpu and key in gpu), None)
            if config["device"] == "cuda"
            else None
        )
        for row, command in plan(name, config, args, pipeline, images, mixed, concept, flax_ok):
            print(f"-- {row['script']} {row['variant']} batch {row['batch']}", flush=True)
            row = measure(row, command, args, env)
            if peak and "images_per_second" in row:
                row["mfu"] = row["images_per_second"] * unet_flops / peak
            rows.append(row)
            if row.get("compiled_shapes"):
                notes.append(
                    f"{config['label']}, `{row['script']}` {row['variant']}: the train step compiled "
                    f"{row['compiled_shapes']} time{'s' if row['compiled_shapes'] != 1 else ''}, once per batch shape "
                    "(the log says which)."
                )
    if args.image_check_count and not (args.recipes_only or args.lora_only):
        rates = image_check_rates(args.work_dir, args.image_check_count)
        notes.append(
            f"Data check at start (every image decoded before training; {os.cpu_count()} CPU cores): "
            f"{rates['jpg']:.0f} JPEGs/s and {rates['png']:.0f} PNGs/s at 512 px, so 100,000 images take "
            f"{100_000 / rates['jpg']:.0f} s and {100_000 / rates['png']:.0f} s."
        )
    if any(TWO_PROCESSES in row["variant"] for row in rows):
        notes.append(
            "Scaling rows (2 processes x half the batch): the same global batch and the same run as the 1-process row "
            "above them, shared by two processes on this machine (PyTorch: torchrun, DDP over gloo, one thread each; "
            "JAX: two processes of one CPU device, gloo collectives). Their peak memory is the largest single process."
        )
    if not flax_ok:
        notes.append(f"Flax rows skipped: no JAX environment at {args.flax_python} (`make test` builds it).")
    recipe_section = [
        "## Recipes: per-step cost of each loss, sampler and optimizer",
        "",
        f"Measured on {datetime.date.today().isoformat()}: `train_text_to_image.py` with `--cache_latents "
        "--cache_text_embeddings` and one recipe flag each; the Flax twins share the math (their per-recipe cost is "
        "not measured: each run compiles for minutes on CPU).",
        "",
        format_recipe_table(rows),
        "",
    ]
    if args.recipes_only:
        text = open(args.output).read() if os.path.exists(args.output) else "# Benchmarks\n"
        text = replace_section(text, recipe_section[0], "\n".join(recipe_section))
        with open(args.output, "w") as f:
            f.write(text)
        print(f"Wrote the recipe section of {args.output}")
        return rows
    if args.lora_only:
        lora_section = [
            LORA_SECTION,
            "",
            f"Measured on {today} ({machine_description()}) by `run_benchmarks.py --lora_only`: each LoRA row "
            "(`--rank 16`, the attention projections) after the full fine-tune row whose command it repeats with "
            f"`--rank 16` added, in the same run; {args.logging_steps * (1 + args.windows)} updates each, the first "
            f"{args.logging_steps} left out. A full `make benchmark` puts these rows in the main table. "
            '"vs uncached square": against the full fine-tune without caches at the same batch.',
            "",
            format_table(rows),
            "",
        ]
        text = open(args.output).read() if os.path.exists(args.output) else "# Benchmarks\n"
        with open(args.output, "w") as f:
            f.write(replace_section(text, LORA_SECTION, "\n".join(lora_section)))
        print(f"Wrote the LoRA section of {args.output}")
        return rows
    report = [
        "# Benchmarks",
        "",
        f"Written by `make benchmark` (`benchmarks/run_benchmarks.py`) on {today}.",
        "",
        f"Machine: {machine_description()}.",
        "",
        f"Each run: {args.logging_steps * (1 + args.windows)} optimizer updates; the first {args.logging_steps} "
        f"(start-up, caching, compilation) are left out; figures are the median over the {args.windows} windows "
        "after them. Random-initialised "
        "pipelines built from configs; synthetic 32-image captioned folder (t2i, `--center_crop --random_flip`) and "
        "4-image concept folder (TI). fp32 on CPU, bf16 on GPU.",
        "",
        format_table(rows),
        "",
        *[f"- {note}" for note in notes],
        "",
        "## Targets",
        "",
        *[f"- {line}" for line in target_lines(rows)],
        "",
        *recipe_section,
    ]
    if args.step_memory:
        step_rows, seconds = measure_step_memory(args.step_memory)
        report += [step_memory.section(step_rows, seconds, today, machine_description()), ""]
    with open(args.output, "w") as f:
        f.write("\n".join(report))
    print(f"Wrote {args.output}")
    return rows


if __name__ == "__main__":
    main()
