"""--save_single_file: the trained pipeline as one .safetensors file in the original Stable Diffusion key layout, read
back by diffusers' own single-file loader (the UI loaders are tested in test_ui_loaders.py)."""

import os

import numpy as np
import torch
from helpers import earlier_run_folder, tree_snapshot
from safetensors import safe_open
from test_train_text_to_image import SCRIPT, base_args

from devkit import tiny_sd


def render(pipeline):
    generator = torch.Generator().manual_seed(0)
    image = pipeline("a red circle", num_inference_steps=3, height=64, width=64, generator=generator, output_type="np")
    return image.images[0]


def components_match(single, folder, dtype, names=("unet", "vae", "text_encoder")):
    """Every weight diffusers reads back from the single file equals the folder's, rounded to the file's dtype."""
    for name in names:
        ours, theirs = getattr(single, name).state_dict(), getattr(folder, name).state_dict()
        assert ours.keys() == theirs.keys(), name
        for key, tensor in theirs.items():
            assert torch.equal(ours[key], tensor.to(dtype).float()), f"{name}.{key}"


def test_single_file_round_trips_through_diffusers(launch, assets, tmp_path):
    out = str(tmp_path / "cat-run")
    launch.accelerate(SCRIPT, base_args(assets, out, "--max_train_steps 2 --save_single_file"))
    path = os.path.join(out, "cat-run.safetensors")
    assert not [name for name in os.listdir(out) if name.endswith(".partial")]
    with safe_open(path, "pt") as f:
        metadata, keys = f.metadata(), list(f.keys())
        assert {f.get_tensor(key).dtype for key in keys} == {torch.float16}, "the default --single_file_dtype fp16"
    assert metadata["modelspec.architecture"] == "stable-diffusion-v1"
    assert metadata["modelspec.prediction_type"] == "epsilon" and metadata["training.global_step"] == "2"
    assert metadata["training.base_model"] == assets["pipeline"] and metadata["modelspec.title"] == "cat-run"
    prefixes = {key.split(".")[0] + "." + key.split(".")[1] for key in keys}
    assert prefixes == {"model.diffusion_model", "first_stage_model.encoder", "first_stage_model.decoder"} | {
        "first_stage_model.quant_conv",
        "first_stage_model.post_quant_conv",
        "cond_stage_model.transformer",
    }

    from diffusers import StableDiffusionPipeline

    folder = StableDiffusionPipeline.from_pretrained(out, safety_checker=None)
    single = StableDiffusionPipeline.from_single_file(path, config=out, safety_checker=None, local_files_only=True)
    components_match(single, folder, torch.float16)
    # The same picture as the folder's weights rounded to fp16; the fp16 rounding itself moves pixels only slightly.
    reference = render(folder)
    for model in [folder.unet, folder.vae, folder.text_encoder]:
        model.load_state_dict({key: tensor.half().float() for key, tensor in model.state_dict().items()})
    assert np.abs(render(single) - render(folder)).max() < 1e-5
    assert np.abs(render(single) - reference).max() < 0.005  # measured 7.7e-4


def test_sd2_layout_v_prediction_and_fp32(launch, assets, tmp_path):
    base = tiny_sd.build_pipeline(
        str(tmp_path / "sd2"), tiny_sd.TINY_SD2, sample_size=64, prediction_type="v_prediction"
    )
    args = base_args(assets, str(tmp_path / "run"), "--max_train_steps 1 --save_single_file --single_file_dtype fp32")
    args[args.index("--pretrained_model_name_or_path") + 1] = base
    launch.accelerate(SCRIPT, args)
    out = str(tmp_path / "run")
    path = os.path.join(out, "run.safetensors")
    with safe_open(path, "pt") as f:
        metadata, keys = f.metadata(), set(f.keys())
    assert metadata["modelspec.architecture"] == "stable-diffusion-v2-768-v"
    assert metadata["modelspec.prediction_type"] == "v"
    # OpenCLIP's fused attention input projection, and no CLIP-L names.
    assert "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight" in keys
    assert not any(key.startswith("cond_stage_model.transformer.") for key in keys)

    from diffusers import StableDiffusionPipeline

    folder = StableDiffusionPipeline.from_pretrained(out, safety_checker=None)
    single = StableDiffusionPipeline.from_single_file(path, config=out, safety_checker=None, local_files_only=True)
    components_match(single, folder, torch.float32)
    assert single.scheduler.config.prediction_type == "v_prediction"
    assert np.abs(render(single) - render(folder)).max() < 1e-5


def test_unknown_architecture_is_refused_before_training(launch, assets, tmp_path):
    architecture = {**tiny_sd.TINY, "unet": {**tiny_sd.TINY["unet"], "class_embed_type": "timestep"}}
    base = tiny_sd.build_pipeline(str(tmp_path / "class-embedding"), architecture, sample_size=64)
    out = tmp_path / "run"
    earlier_run_folder(out)
    (out / "notes.txt").write_text("kept")
    before = tree_snapshot(str(out))
    args = base_args(assets, str(out), "--max_train_steps 1 --save_single_file")
    args[args.index("--pretrained_model_name_or_path") + 1] = base
    result = launch.accelerate(SCRIPT, args, check=False)
    assert result.returncode != 0
    assert "--save_single_file: no original Stable Diffusion single-file layout" in result.output
    assert "class_embed_type='timestep'" in result.output
    assert not os.path.exists(out / "unet") and not os.path.exists(out / "run.safetensors")
    after = tree_snapshot(str(out))
    assert after == before  # refused before training: nothing written, not even the lock


def test_numpy_writes_the_bytes_torch_would(tmp_path):
    """The core reads and writes the weights with NumPy (no torch): every tensor of the single file is the bytes
    torch's conversion and safetensors.torch would write, for each --single_file_dtype, from fp32, fp16 and bf16
    weights, at the edges of bf16's round-to-nearest-even (ties, overflow to inf, subnormals, signed zero)."""
    import json

    import safetensors.torch

    from sdtrain import single_file

    rng = np.random.default_rng(0)
    values = rng.standard_normal(4000).astype(np.float32) * np.float32(10.0) ** rng.integers(-40, 38, 4000)
    edges = [0.0, -0.0, 1.0 + 2**-8, 1.0 + 3 * 2**-8, 3.3961e38, -3.3961e38, 1e-40, 6e-8, 65520.0, np.inf]
    values = np.concatenate([values, np.array(edges, np.float32)]).reshape(-1, 10)
    weights = {
        "a.weight": torch.from_numpy(values),
        "b.weight": torch.from_numpy(values[:100]).to(torch.bfloat16),
        "c.weight": torch.from_numpy(values[:100]).to(torch.float16),
    }
    component = tmp_path / "unet"
    component.mkdir()
    safetensors.torch.save_file(weights, str(component / "diffusion_pytorch_model.safetensors"))

    def body(path):
        """The header (metadata written in no fixed order, so parsed) and the tensor bytes."""
        data = path.read_bytes()
        size = int.from_bytes(data[:8], "little")
        return json.loads(data[8 : 8 + size]), data[8 + size :]

    for dtype, torch_dtype in [("fp16", torch.float16), ("bf16", torch.bfloat16), ("fp32", torch.float32)]:
        state = single_file.read_component_weights(str(component))
        single_file.write_single_file(state, str(tmp_path / f"{dtype}.safetensors"), dtype, {"training.step": "1"})
        expected = {key: tensor.to(torch_dtype).contiguous() for key, tensor in weights.items()}
        safetensors.torch.save_file(
            expected, str(tmp_path / "torch.safetensors"), metadata={"format": "pt", "training.step": "1"}
        )
        assert body(tmp_path / f"{dtype}.safetensors") == body(tmp_path / "torch.safetensors"), dtype
