"""The sdtrain package, which the four scripts import from their own folder: it imports in either environment, since
no module of it imports a framework when it is imported, and the scripts find it without any install step."""

import os
import subprocess
import sys

from conftest import REPO

FRAMEWORKS = ["torch", "torchvision", "jax", "flax", "optax", "diffusers", "transformers", "accelerate", "safetensors"]


def test_importing_every_module_imports_no_framework():
    folder = os.path.join(REPO, "sdtrain")
    modules = sorted(name[:-3] for name in os.listdir(folder) if name.endswith(".py") and name != "__init__.py")
    assert {"run_folder", "images", "batching", "captions", "single_file", "torch_training"} <= set(modules)
    probe = (
        "import importlib, sys\n"
        f"for module in {modules!r}:\n"
        "    importlib.import_module('sdtrain.' + module)\n"
        f"print(sorted(name for name in {FRAMEWORKS!r} if name in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "[]"


def test_a_script_finds_the_package_beside_it_from_any_folder(tmp_path):
    """Launched by path from elsewhere (no install, no PYTHONPATH), as a user runs a copy of the repository."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    script = os.path.join(REPO, "train_text_to_image.py")
    result = subprocess.run(
        [sys.executable, script, "--help"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # Grouped flags, each with its default.
    assert "Model:" in result.stdout and "Checkpointing:" in result.stdout
    assert "(default: 512)" in result.stdout
