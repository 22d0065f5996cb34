"""The benchmark runs with one command and writes its table (a short smoke run: the figures themselves are measured
by `make benchmark`, never asserted here)."""

import os
import re
import subprocess
import sys

from conftest import OFFLINE_ENV, REPO

from devkit.command_line import command_line


def test_benchmark_writes_a_table_with_every_row(tmp_path):
    report = tmp_path / "BENCHMARKS.md"
    flags = "--configs tiny sd15 sdxl --logging_steps 2 --windows 1 --image_check_count 40"
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
    text = report.read_text()
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
    # The tiny SDXL pipeline: train_text_to_image.py's rows (SDXL is not in textual inversion or the Flax twins yet).
    sdxl = [row.strip("| ").split(" | ") for row in rows if row.startswith("| (d)")]
    assert [(r[1], r[2]) for r in sdxl] == [r for r in [(r[1], r[2]) for r in tiny] if "textual_inversion" not in r[0]]
    assert all(float(row[6]) > 0 and float(row[7]) > 0 for row in sdxl), sdxl
    assert re.search(r"\(d\) tiny SDXL pipeline, per 64 px image: UNet forward \+ backward [\d.e-]+ TFLOPs", text)
    # Without a GPU the SD 1.5 rows are listed, marked not measured; its FLOPs are counted on the meta device.
    sd15 = [row for row in rows if row.startswith("| (c)")]
    assert len(sd15) == 21 and all("not measured" in row for row in sd15)
    # Its recipe rows: every loss, sampler and optimizer over the cached run, 8-bit AdamW included (CUDA only), and
    # that run once more.
    recipes = [row.split(" | ")[1] for row in sd15 if "`--" in row.split(" | ")[1]]
    assert len(recipes) == 10 and "`--optimizer adamw_8bit`" in recipes and "`--loss_type huber`" in recipes
    assert sum("(none: AdamW + L2, measured again)" in row for row in sd15) == 1
    flops = re.search(r"\(c\) SD 1.5 architecture, per 512 px image: UNet forward \+ backward ([\d.]+) TFLOPs", text)
    assert flops and abs(float(flops.group(1)) - 2.41) < 0.01  # the published figure for SD's UNet at 512 px
    assert "Flax rows skipped" in text
    assert re.search(r"Data check at start .*: \d+ JPEGs/s and \d+ PNGs/s at 512 px", text)
