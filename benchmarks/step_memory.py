#!/usr/bin/env python
"""Peak memory of one training step of the real SD 1.5 and SDXL base UNets on CPU: a LoRA against the full fine-tune.

    .venv/bin/python benchmarks/run_benchmarks.py --step_memory_only     # this section of BENCHMARKS.md only
    .venv/bin/python benchmarks/step_memory.py sdxl lora                 # one row, printed as JSON

One step is what the training script does per update: the UNet's forward on a batch of one noisy latent, an MSE loss
against the noise, the backward pass and a fused AdamW step, in fp32. Each row runs in a fresh process, and its peak
memory is that process's maximum resident set size (ru_maxrss, read by the parent when the child ends). Beside it the
bytes of the weights, the gradients and the AdamW state are counted exactly from the tensors after the step: those
three scale with the model, the rest of the peak (activations, the Python and PyTorch runtime) with the batch and the
resolution. The UNets are built from their published configs with random weights: memory does not depend on the
values. A row whose weights, gradients and optimizer state alone would not fit in this machine's memory is skipped,
with those bytes computed from the parameter count.
"""

import json
import os
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))

# diffusers' UNet2DConditionModel configs of the released checkpoints (stable-diffusion-v1-5 and
# stable-diffusion-xl-base-1.0, unet/config.json), written out rather than downloaded.
SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    flip_sin_to_cos=True,
    freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    downsample_padding=1,
    mid_block_scale_factor=1,
    act_fn="silu",
    norm_num_groups=32,
    norm_eps=1e-5,
    cross_attention_dim=768,
    attention_head_dim=8,  # diffusers' historical name: SD 1.x has 8 heads at every level
)
SDXL_UNET = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    flip_sin_to_cos=True,
    freq_shift=0,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),  # heads per level (64 channels each)
    use_linear_projection=True,
    act_fn="silu",
    norm_num_groups=32,
    norm_eps=1e-5,
    cross_attention_dim=2048,  # CLIP ViT-L (768) and OpenCLIP ViT-bigG (1280) side by side
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,  # the pooled bigG embedding (1280) + 6 size numbers x 256
)
# The frozen components a training run also holds on the device (text encoders, VAE), for the GPU figures computed
# from these counts: CLIP ViT-L/14's text tower (SD 1.5, and SDXL's first), OpenCLIP ViT-bigG's (SDXL's second) and
# the VAE both use.
CLIP_L = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    projection_dim=768,
    hidden_act="quick_gelu",
)
CLIP_BIG_G = dict(
    vocab_size=49408,
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=20,
    max_position_embeddings=77,
    projection_dim=1280,
    hidden_act="gelu",
)
VAE = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    norm_num_groups=32,
)
# A UNet of SD's structure small enough for the benchmark's own test (tests/test_benchmark.py).
TINY_UNET = dict(
    sample_size=8,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(32, 64),
    layers_per_block=1,
    attention_head_dim=8,
    norm_num_groups=32,
    cross_attention_dim=32,
)
MODELS = {
    "sd15": dict(label="SD 1.5 UNet", unet=SD15_UNET, text_encoders=[("clip", CLIP_L)]),
    "sdxl": dict(
        label="SDXL base UNet", unet=SDXL_UNET, text_encoders=[("clip", CLIP_L), ("clip_projection", CLIP_BIG_G)]
    ),
    "tiny": dict(label="tiny SD-shaped UNet", unet=TINY_UNET, text_encoders=[]),
}
METHODS = {"lora": "LoRA rank 16 (attention projections), base frozen", "full": "full fine-tune"}
# The LoRA the training script's defaults give at --rank 16: diffusers' choice of the attention projections.
LORA = dict(r=16, lora_alpha=16, target_modules=["to_k", "to_q", "to_v", "to_out.0"])
LATENT_SIZE = 32  # 256 px images
# AdamW keeps two fp32 moments per trained parameter; bitsandbytes' 8-bit AdamW one byte each (and a float32 scale per
# block of 256 values, 1/32 of a byte per parameter per moment, which is left out here).
ADAMW_BYTES, ADAMW_8BIT_BYTES = 8, 2
# Memory a row needs beyond its weights, gradients and optimizer state before it is started: the runtime and the
# activations of a batch of one 32 x 32 latent (measured here: well under this).
HEADROOM_BYTES = 3 * 2**30


def build_unet(model, method):
    """The model's UNet with random weights, and the parameters its training updates."""
    import peft
    import torch
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(**MODELS[model]["unet"])
    if method == "lora":
        unet.requires_grad_(False)
        unet.add_adapter(peft.LoraConfig(**LORA))
    return unet, [p for p in unet.parameters() if p.requires_grad], torch


def parameter_counts(model):
    """(UNet parameters, LoRA parameters, frozen text encoder + VAE parameters), counted on the meta device: shapes
    only, so SDXL's 2.6 billion cost no memory."""
    import torch
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        unet, trained, _ = build_unet(model, "lora")
        base = sum(p.numel() for p in unet.parameters() if not p.requires_grad)
        lora = sum(p.numel() for p in trained)
        frozen = sum(p.numel() for p in AutoencoderKL(**VAE).parameters()) if MODELS[model]["text_encoders"] else 0
        for kind, config in MODELS[model]["text_encoders"]:
            module = CLIPTextModel if kind == "clip" else CLIPTextModelWithProjection
            frozen += sum(p.numel() for p in module(CLIPTextConfig(**config)).parameters())
    return base, lora, frozen


def static_bytes(method, base, lora):
    """fp32 weights, gradients and AdamW state of a row (AdamW's step counters left out), by kind."""
    trained = lora if method == "lora" else base
    weights = 4 * (base + lora if method == "lora" else base)
    return dict(weights=weights, gradients=4 * trained, optimizer_state=ADAMW_BYTES * trained)


def one_step(model, method, latent_size):
    """Run in the child: build, one training step, and the exact bytes of what the step keeps."""
    started = time.perf_counter()
    unet, params, torch = build_unet(model, method)
    built = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    built_seconds = time.perf_counter() - started
    config = MODELS[model]["unet"]
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, latent_size, latent_size, generator=generator)
    noise = torch.randn(latents.shape, generator=generator)
    context = torch.randn(1, 77, config["cross_attention_dim"], generator=generator)
    added = None
    if config.get("addition_embed_type") == "text_time":
        size = latent_size * 8
        pooled_width = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
        added = {
            "text_embeds": torch.randn(1, pooled_width, generator=generator),
            "time_ids": torch.tensor([[size, size, 0, 0, size, size]], dtype=torch.float32),
        }
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)  # the training script's default optimizer
    unet.train()
    started = time.perf_counter()
    prediction = unet(latents + noise, torch.tensor([500]), context, added_cond_kwargs=added).sample
    loss = torch.nn.functional.mse_loss(prediction, noise)
    loss.backward()
    optimizer.step()
    step_seconds = time.perf_counter() - started

    def nbytes(tensors):
        return sum(t.numel() * t.element_size() for t in tensors)

    return dict(
        model=model,
        method=method,
        latent_size=latent_size,
        parameters=sum(p.numel() for p in unet.parameters()),
        trainable_parameters=sum(p.numel() for p in params),
        weight_bytes=nbytes(unet.parameters()),
        gradient_bytes=nbytes(p.grad for p in unet.parameters() if p.grad is not None),
        optimizer_state_bytes=nbytes(
            value for state in optimizer.state.values() for value in state.values() if torch.is_tensor(value)
        ),
        rss_after_build_bytes=built,
        build_seconds=built_seconds,
        step_seconds=step_seconds,
        loss_finite=bool(torch.isfinite(loss)),
    )


def memory_info():
    """(MemTotal, MemAvailable) in bytes, from /proc/meminfo (None off Linux)."""
    if not os.path.exists("/proc/meminfo"):
        return None, None
    fields = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in open("/proc/meminfo")}
    return fields.get("MemTotal"), fields.get("MemAvailable")


def measure(model, method, latent_size=LATENT_SIZE, counts=None):
    """One row: run the step in a fresh process and read its peak RSS, or skip it when the weights, gradients and
    AdamW state alone would not fit in this machine's memory (total, or available now)."""
    base, lora, frozen = counts or parameter_counts(model)
    row = dict(model=model, method=method, latent_size=latent_size, base_parameters=base, lora_parameters=lora)
    row["frozen_parameters"] = frozen
    needed = sum(static_bytes(method, base, lora).values())
    total, available = memory_info()
    if total is not None and needed + HEADROOM_BYTES > total:
        row["skipped"] = f"needs {needed / 2**30:.1f} GiB for weights, gradients and AdamW state; this machine has "
        row["skipped"] += f"{total / 2**30:.1f} GiB in all"
    elif available is not None and needed + HEADROOM_BYTES > available:
        row["skipped"] = (
            f"needs {needed / 2**30:.1f} GiB for weights, gradients and AdamW state (+ {HEADROOM_BYTES / 2**30:.0f}"
        )
        row["skipped"] += f" GiB headroom); {available / 2**30:.1f} GiB available when it was due to start"
    if "skipped" in row:
        print(f"  skipped: {row['skipped']}", flush=True)
        return row
    command = [sys.executable, os.path.abspath(__file__), model, method, "--latent_size", str(latent_size)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    row["wall_seconds"] = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        row["error"] = (output.strip().splitlines() or [f"exit status {status}"])[-1][:200]
        print(f"  FAILED: {row['error']}", flush=True)
        return row
    result = json.loads([line for line in output.splitlines() if line.startswith("{")][-1])
    row.update(result, peak_rss_bytes=usage.ru_maxrss * 1024)  # ru_maxrss is in KiB on Linux
    print(f"  peak RSS {row['peak_rss_bytes'] / 2**30:.2f} GiB ({row['wall_seconds']:.0f} s)", flush=True)
    return row


def gib(value):
    return f"{value / 2**30:.2f}"


def format_rows(rows):
    header = ["UNet", "training", "trained parameters", "weights", "gradients", "AdamW state", "sum", "peak RSS"]
    header += ["RSS after build", "step s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        label, method = MODELS[r["model"]]["label"], METHODS[r["method"]]
        trained = r["lora_parameters"] if r["method"] == "lora" else r["base_parameters"]
        if "peak_rss_bytes" in r:
            static = r["weight_bytes"] + r["gradient_bytes"] + r["optimizer_state_bytes"]
            figures = [r["weight_bytes"], r["gradient_bytes"], r["optimizer_state_bytes"], static]
            figures = [gib(value) for value in figures] + [gib(r["peak_rss_bytes"]), gib(r["rss_after_build_bytes"])]
            figures.append(f"{r['step_seconds']:.1f}")
        else:
            computed = list(static_bytes(r["method"], r["base_parameters"], r["lora_parameters"]).values())
            figures = [gib(value) + " (computed)" for value in computed] + [gib(sum(computed)) + " (computed)"]
            figures += [r.get("skipped") or r.get("error", "not measured"), "", ""]
        lines.append("| " + " | ".join([label, method, f"{trained:,}"] + figures) + " |")
    return "\n".join(lines)


def gpu_lines(rows):
    """What each model's training keeps on a GPU, computed from the parameter counts: LoRA (base and frozen
    components in bf16, adapter, its gradients and AdamW state in fp32) and the full fine-tune (fp32 master weights,
    gradients and AdamW or 8-bit AdamW state, bf16 weight copies under autocast, frozen components in bf16)."""
    header = ["model", "training", "UNet weights", "gradients", "optimizer state", "bf16 copies (autocast)"]
    header += ["text encoders + VAE", "total", "left of 24 GiB", "left of 16 GiB"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    seen = set()
    for r in rows:
        if r["model"] in seen or r["model"] not in ("sd15", "sdxl"):
            continue
        seen.add(r["model"])
        base, lora, frozen = r["base_parameters"], r["lora_parameters"], r["frozen_parameters"]
        # Autocast keeps a bf16 copy of every fp32 weight that needs a gradient for the forward and backward pass;
        # LoRA's frozen base is bf16 already (its fp32 adapter's copies are left out: a few MiB).
        for method, weights, gradients, state, copies in [
            ("LoRA r16, AdamW", 2 * base + 4 * lora, 4 * lora, ADAMW_BYTES * lora, 0),
            ("full, AdamW", 4 * base, 4 * base, ADAMW_BYTES * base, 2 * base),
            ("full, 8-bit AdamW", 4 * base, 4 * base, ADAMW_8BIT_BYTES * base, 2 * base),
        ]:
            total = weights + gradients + state + copies + 2 * frozen
            left = [size * 2**30 - total for size in (24, 16)]
            left = [f"{value / 2**30:.1f}" if value > 0 else f"none ({-value / 2**30:.1f} short)" for value in left]
            figures = [gib(value) for value in (weights, gradients, state, copies, 2 * frozen, total)] + left
            lines.append(
                "| " + " | ".join([MODELS[r["model"]]["label"].removesuffix(" UNet"), method] + figures) + " |"
            )
    return "\n".join(lines)


SECTION_TITLE = "## Memory of one training step: LoRA and full fine-tune of the SD 1.5 and SDXL UNets"


def section(rows, wall_seconds, date, machine):
    """The BENCHMARKS.md section."""
    measured = [r for r in rows if "peak_rss_bytes" in r]
    latent = rows[0]["latent_size"] if rows else LATENT_SIZE
    text = [
        SECTION_TITLE,
        "",
        f"Measured on {date} ({machine}; `benchmarks/step_memory.py`, {wall_seconds / 60:.1f} min for the section) "
        "with the released UNet architectures (diffusers configs, random weights): one step (forward on a batch of "
        f"one {latent} x {latent} latent, i.e. {latent * 8} px, MSE loss, backward, fused AdamW step) in fp32 on CPU, "
        "each row in a fresh process. LoRA: peft's `LoraConfig(r=16, lora_alpha=16, target_modules=[to_k, to_q, to_v, "
        "to_out.0])`, what `--rank 16` trains by default, with the base frozen. Weights, gradients and AdamW state are "
        "counted exactly from the tensors after the step; peak RSS is the process's maximum resident set size "
        "(runtime and activations included); RSS after build is the peak before the step began. Sizes in GiB.",
        "",
        format_rows(rows),
        "",
    ]
    if any("skipped" in r for r in rows):
        text += [
            "A skipped row's weights, gradients and AdamW state are computed from its parameter count (fp32: 4 bytes "
            "per weight and per gradient, 8 per parameter of AdamW state).",
            "",
        ]
    if not measured:
        text += ["No row was measured.", ""]
    gpu = gpu_lines(rows)
    if gpu.count("\n") > 1:
        text += [
            "### Computed for a GPU (not measured on one)",
            "",
            "The same parameter counts in the precisions a bf16/fp16 run keeps them in: LoRA holds the frozen UNet in "
            "bf16 (2 bytes per parameter) and the adapter, its gradients and AdamW state in fp32 (16 bytes per adapter "
            "parameter); the full fine-tune holds fp32 master weights (4) and gradients (4), AdamW state (8, or 2 with "
            "bitsandbytes' 8-bit AdamW) and, while the step runs, the bf16 copies autocast makes of the weights (2). "
            "Text encoders and VAE in bf16 (SDXL's VAE stays fp32 without an fp16-safe one: +0.16 GiB). Activations, "
            "the CUDA context and allocator slack are not included: they must fit in what is left (see "
            "[docs/speed.md](docs/speed.md)). GiB.",
            "",
            gpu,
            "",
        ]
    return "\n".join(text)


def main(argv=None):
    import argparse

    parser = argparse.ArgumentParser(description="One row of the step-memory benchmark, printed as JSON.")
    parser.add_argument("model", choices=sorted(MODELS))
    parser.add_argument("method", choices=sorted(METHODS))
    parser.add_argument("--latent_size", type=int, default=LATENT_SIZE)
    args = parser.parse_args(argv)
    print(json.dumps(one_step(args.model, args.method, args.latent_size)), flush=True)


if __name__ == "__main__":
    main()
