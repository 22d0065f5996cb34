"""The benchmark runs with one command and writes its table (a short smoke run: the figures themselves are measured
by `make benchmark`, never asserted here)."""

import json
import os
import re
import subprocess
import sys

from conftest import OFFLINE_ENV, REPO

from devkit.command_line import command_line

sys.path.insert(0, os.path.join(REPO, "benchmarks"))  # the benchmark's modules, imported as its script imports them
import step_memory  # noqa: E402


def run_benchmark(tmp_path, flags):
    report = tmp_path / "BENCHMARKS.md"
    paths = ["--work_dir", tmp_path / "work", "--output", report, "--flax_python", tmp_path / "no-flax-python"]
    command = [sys.executable, os.path.join(REPO, "benchmarks", "run_benchmarks.py"), *command_line(flags, *paths)]
    result = subprocess.run(
        command,
        cwd=REPO,
        env={**os.environ, **OFFLINE_ENV, "CUDA_VISIBLE_DEVICES": ""},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return report.read_text()


def test_benchmark_writes_a_table_with_every_row(tmp_path):
    """The main table of configs (a) and (c), then --lora_only on the tiny SDXL pipeline (d), which adds its LoRA
    section to the same file: (d)'s other rows run the code of (a)'s on another pipeline, so the smoke run leaves them
    out."""
    fast = "--logging_steps 2 --windows 1"
    text = run_benchmark(tmp_path, f"--configs tiny sd15 {fast} --image_check_count 40 --step_memory")
    assert "Machine: " in text and " cores, " in text
    rows = [line for line in text.splitlines() if line.startswith("| (")]
    tiny = [row.strip("| ").split(" | ") for row in rows if row.startswith("| (a)")]
    assert [(r[1], r[2]) for r in tiny] == [
        ("`train_text_to_image.py`", "VAE + text encoder in the loop"),
        ("`train_text_to_image.py`", "--cache_latents"),
        ("`train_text_to_image.py`", "--cache_latents --cache_text_embeddings"),
        ("`train_text_to_image.py`", "--use_aspect_ratio_buckets, mixed aspect ratios"),
        ("`textual_inversion.py`", "VAE in the loop"),
        ("`textual_inversion.py`", "--cache_latents"),
        ("`train_text_to_image.py`", "2 processes x half the batch, VAE + text encoder in the loop"),
    ]
    for row in tiny:
        assert float(row[6]) > 0 and float(row[7]) > 0 and row[8].endswith("GiB (RSS)"), row
    compared = ("cache", "buckets", "processes")  # compared with the uncached square run of one process
    assert all(re.fullmatch(r"\d+\.\d\dx", row[10]) for row in tiny if any(word in row[2] for word in compared))
    # Without a GPU the SD 1.5 rows are listed, marked not measured; its FLOPs are counted on the meta device.
    sd15 = [row for row in rows if row.startswith("| (c)")]
    assert len(sd15) == 23 and all("not measured" in row for row in sd15)
    assert sum(" | --rank 16, --cache_latents --cache_text_embeddings" in row for row in sd15) == 2
    # Its recipe rows: every loss, sampler and optimizer over the cached run, 8-bit AdamW included (CUDA only), and
    # that run once more.
    recipes = [row.split(" | ")[1] for row in sd15 if "`--" in row.split(" | ")[1]]
    assert len(recipes) == 10 and "`--optimizer adamw_8bit`" in recipes and "`--loss_type huber`" in recipes
    assert sum("(none: AdamW + L2, measured again)" in row for row in sd15) == 1
    flops = re.search(r"\(c\) SD 1.5 architecture, per 512 px image: UNet forward \+ backward ([\d.]+) TFLOPs", text)
    assert flops and abs(float(flops.group(1)) - 2.41) < 0.01  # the published figure for SD's UNet at 512 px
    assert "Flax rows skipped" in text
    assert re.search(r"Data check at start .*: \d+ JPEGs/s and \d+ PNGs/s at 512 px", text)
    assert step_memory.SECTION_TITLE not in text  # --step_memory given no UNet
    # The tiny SDXL pipeline (d), --lora_only: each LoRA row after the full fine-tune it repeats with --rank 16,
    # cached and uncached, measured (not marked) and compared with the uncached full fine-tune.
    text = run_benchmark(tmp_path, f"--configs sdxl --lora_only {fast}")
    assert "| (a)" in text, "--lora_only replaces its own section and keeps the main table"
    section = text[text.index("## LoRA beside the full fine-tune") :]
    sdxl = [line.strip("| ").split(" | ") for line in section.splitlines() if line.startswith("| (d)")]
    cached_variant = "--cache_latents --cache_text_embeddings"
    uncached = "VAE + text encoder in the loop"
    variants = [cached_variant, "--rank 16, " + cached_variant, uncached, "--rank 16, " + uncached]
    assert [(r[1], r[2]) for r in sdxl] == [("`train_text_to_image.py`", variant) for variant in variants]
    assert all(float(row[6]) > 0 and float(row[7]) > 0 for row in sdxl if not row[2].startswith("--rank")), sdxl
    assert all(float(r[6]) > 0 and re.fullmatch(r"\d+\.\d\dx", r[10]) for r in sdxl if r[2] != uncached), sdxl


def test_benchmark_plan_adds_a_lora_beside_the_full_fine_tune():
    """Configs (b) and (d) train a LoRA with the command of their full fine-tune plus --rank 16 (PyTorch, uncached and
    cached; the Flax twin in (b)), and (c) on a GPU beside its batch-16 cached run and its batch-1 memory row;
    --plan_only lists every row's command without building or running anything."""
    command = [sys.executable, os.path.join(REPO, "benchmarks", "run_benchmarks.py"), "--plan_only"]
    command += ["--configs", "tiny", "small", "sdxl", "sd15", "--flax_python", sys.executable]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    planned = [json.loads(line) for line in result.stdout.splitlines()]
    runs = [entry for entry in planned if "command" in entry]
    lora = [entry for entry in runs if "--rank" in entry["command"]]
    assert [(entry["config"][:3], entry["script"], entry["variant"]) for entry in lora] == [
        ("(b)", "train_text_to_image.py", "--rank 16, VAE + text encoder in the loop"),
        ("(b)", "train_text_to_image.py", "--rank 16, --cache_latents --cache_text_embeddings"),
        ("(b)", "train_text_to_image_flax.py", "JAX, --rank 16, VAE in the step"),
        ("(d)", "train_text_to_image.py", "--rank 16, VAE + text encoder in the loop"),
        ("(d)", "train_text_to_image.py", "--rank 16, --cache_latents --cache_text_embeddings"),
        ("(c)", "train_text_to_image.py", "--rank 16, --cache_latents --cache_text_embeddings"),
        (
            "(c)",
            "train_text_to_image.py",
            "--rank 16, --cache_latents --cache_text_embeddings --gradient_checkpointing --use_8bit_adam",
        ),
    ]

    def without_output_dir(command):
        at = command.index("--output_dir")
        return command[:at] + command[at + 2 :]

    def key(entry):
        return entry["config"], entry["script"], entry["variant"].replace("--rank 16, ", ""), entry["batch"]

    for entry in lora:
        (full,) = [other for other in runs if other not in lora and key(other) == key(entry)]
        assert without_output_dir(entry["command"]) == without_output_dir(full["command"]) + ["--rank", "16"]
        assert (
            entry["command"][entry["command"].index("--output_dir") + 1]
            != full["command"][full["command"].index("--output_dir") + 1]
        )
    # --lora_only: the LoRA rows and the full fine-tune rows they compare with, nothing else.
    result = subprocess.run(command + ["--lora_only"], cwd=REPO, capture_output=True, text=True, timeout=120)
    only = [json.loads(line) for line in result.stdout.splitlines()]
    assert sorted(set(map(key, only))) == sorted(set(map(key, lora))) and len(only) == 2 * len(lora)
    assert [(e["step_memory"], e["method"]) for e in planned if "step_memory" in e] == [
        ("sd15", "lora"),
        ("sd15", "full"),
        ("sdxl", "lora"),
        ("sdxl", "full"),
    ]


def test_step_memory_counts_weights_gradients_and_adamw_state_exactly():
    """One training step of a tiny UNet per row, each in its own process: the bytes of what the step keeps, counted
    from the tensors, and the child's peak RSS; a row that cannot fit is skipped with its bytes computed."""
    lora, full = (step_memory.measure("tiny", method) for method in step_memory.METHODS)
    base, adapter = full["base_parameters"], full["lora_parameters"]
    assert full["trainable_parameters"] == base and lora["trainable_parameters"] == adapter < base / 10
    assert full["weight_bytes"] == full["gradient_bytes"] == 4 * base
    assert lora["weight_bytes"] == 4 * (base + adapter) and lora["gradient_bytes"] == 4 * adapter
    # AdamW: two fp32 moments per trained parameter, and a float32 step counter per trained tensor.
    assert 8 * adapter < lora["optimizer_state_bytes"] < 8 * adapter + 4 * 1000
    assert 8 * base < full["optimizer_state_bytes"] < 8 * base + 4 * 1000
    for row in (lora, full):
        assert row["loss_finite"] and row["peak_rss_bytes"] >= row["rss_after_build_bytes"] > 100 * 2**20, row
    huge = step_memory.measure("tiny", "full", counts=(10**12, 0, 0))  # 16 TB of fp32 weights, gradients and AdamW
    assert huge["skipped"].startswith("needs 14901.2 GiB for weights, gradients and AdamW state; this machine has ")
    text = step_memory.section([lora, full, huge], 12.0, "2026-01-01", "a machine")
    table = [line for line in text.splitlines() if line.startswith("| tiny")]
    assert len(table) == 3 and "3725.29 (computed)" in table[2] and "needs 14901.2 GiB" in table[2]
    assert all(re.fullmatch(r"\d+\.\d\d", cell) for cell in table[0].strip("| ").split(" | ")[3:9]), table[0]
