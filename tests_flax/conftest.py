"""Fixtures for the Flax twins, run in the Flax environment (.venv-flax). The tiny pipeline and data are built by the
PyTorch environment (.venv, current diffusers and transformers), exactly as a user's PyTorch checkpoint would be,
and the outputs are loaded back there."""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCH_PYTHON = os.environ.get("TORCH_PYTHON", os.path.join(REPO, ".venv", "bin", "python"))
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
# Two host devices, and fewer XLA optimisations: the tiny models compile faster and the tests stay short.
XLA_FLAGS = " ".join(
    [
        "--xla_force_host_platform_device_count=2",
        "--xla_backend_optimization_level=0",
        "--xla_llvm_disable_expensive_passes=true",
    ]
)
os.environ.update(OFFLINE_ENV)
os.environ.setdefault("XLA_FLAGS", XLA_FLAGS)


def run_torch(code_or_args, check=True):
    """Run Python in the PyTorch environment: a list of arguments, or a snippet of code."""
    command = [TORCH_PYTHON] + (code_or_args if isinstance(code_or_args, list) else ["-c", code_or_args])
    env = {**os.environ, **OFFLINE_ENV, "PYTHONPATH": REPO}  # the scripts and devkit import by name
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"PyTorch environment failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
    """One persistent XLA compilation cache for the whole run (shared by the pytest -n workers): the launched scripts
    compile the same tiny train steps again and again, and a cached executable is the one XLA would build."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    os.environ["JAX_COMPILATION_CACHE_DIR"] = str(root / "jax-compilation-cache")
    return os.environ["JAX_COMPILATION_CACHE_DIR"]


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    if not os.path.exists(TORCH_PYTHON):
        pytest.fail(
            f"the PyTorch environment {TORCH_PYTHON} is missing: run `make test`, which builds both environments"
        )
    root = tmp_path_factory.mktemp("assets")
    run_torch(f"""
from devkit import tiny_sd
tiny_sd.build_tiny_pipeline({str(root / "pipeline")!r})
tiny_sd.write_imagefolder({str(root / "images")!r}, num_images=10, size=72)
tiny_sd.write_concept_folder({str(root / "concept")!r}, num_images=4, size=72)
tiny_sd.write_mixed_imagefolder({str(root / "mixed")!r})
""")
    names = ["pipeline", "images", "concept", "mixed"]
    return {name: str(root / name) for name in names}


@pytest.fixture(scope="session")
def sdxl_pipeline(tmp_path_factory):
    """A tiny SDXL pipeline (devkit/tiny_sd.py TINY_SDXL) in the layout StableDiffusionXLPipeline saves."""
    path = str(tmp_path_factory.mktemp("sdxl") / "pipeline")
    run_torch(f"from devkit import tiny_sd; tiny_sd.build_tiny_sdxl_pipeline({path!r})")
    return path


class FlaxLauncher:
    def run(self, script, args, check=True, devices=2):
        flags = XLA_FLAGS.replace("device_count=2", f"device_count={devices}")
        env = {**os.environ, **OFFLINE_ENV, "PYTHONUNBUFFERED": "1", "XLA_FLAGS": flags}
        result = subprocess.run(
            [sys.executable, script] + [str(a) for a in args],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        result.output = result.stdout + result.stderr
        if check and result.returncode != 0:
            raise AssertionError(f"{script} failed ({result.returncode}):\n{result.output[-6000:]}")
        return result

    def start(self, script, args, devices=2):
        """The launch left running (see devkit.running_launch)."""
        from devkit.running_launch import RunningLaunch

        flags = XLA_FLAGS.replace("device_count=2", f"device_count={devices}")
        env = {**os.environ, **OFFLINE_ENV, "PYTHONUNBUFFERED": "1", "XLA_FLAGS": flags}
        return RunningLaunch([sys.executable, script] + [str(a) for a in args], env, cwd=REPO)


@pytest.fixture(scope="session")
def launch():
    return FlaxLauncher()
