"""Session fixtures: a tiny SD pipeline and small datasets built offline, and a launcher that runs the scripts the way
users do (`accelerate launch --config_file <basic config> script.py ...`)."""

import os
import signal
import subprocess
import sys

import pytest

from devkit import tiny_sd
from devkit.running_launch import RunningLaunch, free_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)

# No test may reach the network: the hub clients must fail fast instead of hanging.
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
os.environ.update(OFFLINE_ENV)


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    paths = {
        "pipeline": tiny_sd.build_tiny_pipeline(str(root / "pipeline")),
        # 72 px images trained at 64 px, so the random crop has room to move.
        "images": tiny_sd.write_imagefolder(str(root / "images"), num_images=10, size=72),
        "images_lists": tiny_sd.write_imagefolder(
            str(root / "images_lists"), num_images=10, size=72, caption_lists=True
        ),
        "saved_dataset": tiny_sd.write_saved_dataset(str(root / "saved_dataset")),
        # Wide, tall and square images with tag captions, for the aspect-ratio buckets.
        "mixed": tiny_sd.write_mixed_imagefolder(str(root / "mixed")),
    }
    from accelerate.utils import write_basic_config

    paths["accelerate_config"] = str(root / "accelerate.yaml")
    write_basic_config(mixed_precision="no", save_location=paths["accelerate_config"])
    return paths


@pytest.fixture(scope="session")
def sdxl_pipeline(tmp_path_factory):
    """A tiny SDXL pipeline (devkit/tiny_sd.py TINY_SDXL) in the layout StableDiffusionXLPipeline saves."""
    return tiny_sd.build_tiny_sdxl_pipeline(str(tmp_path_factory.mktemp("sdxl") / "pipeline"))


class Launcher:
    def __init__(self, assets):
        self.assets = assets

    def _run(self, command, extra_env=None, timeout=900):
        env = {**os.environ, **OFFLINE_ENV, "PYTHONUNBUFFERED": "1", **(extra_env or {})}
        result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        result.output = result.stdout + result.stderr
        return result

    def accelerate(self, script, args, check=True, extra_env=None):
        """`accelerate launch --config_file <basic config> script args...`; raises with the output when check fails."""
        command = [os.path.join(BIN, "accelerate"), "launch", "--config_file", self.assets["accelerate_config"], script]
        result = self._run(command + [str(a) for a in args], extra_env)
        if check and result.returncode != 0:
            raise AssertionError(f"{script} failed ({result.returncode}):\n{result.output[-6000:]}")
        return result

    def start(self, script, args, launcher="accelerate", extra_env=None):
        """Start a launch without waiting for it: "accelerate" (as `accelerate` above), "torchrun" (2 processes) or
        "python" (the script run directly)."""
        env = {**os.environ, **OFFLINE_ENV, "PYTHONUNBUFFERED": "1", **(extra_env or {})}
        if launcher == "accelerate":
            command = [os.path.join(BIN, "accelerate"), "launch", "--config_file", self.assets["accelerate_config"]]
        elif launcher == "torchrun":
            command = [os.path.join(BIN, "torchrun"), "--nproc_per_node", "2", "--master_port", free_port()]
            env.update(ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1")
        else:
            command = [sys.executable]
        return RunningLaunch(command + [script] + [str(a) for a in args], env, cwd=REPO)

    def torchrun_nodes(self, script, args, nnodes=2):
        """Two "machines" on this one: `torchrun --nnodes 2 --nproc_per_node 1 --node_rank i --master_addr 127.0.0.1
        --master_port P script args...` started side by side, as a multi-node job starts one per node. Raises with the
        output of the node that failed."""
        rendezvous = ["--nnodes", str(nnodes), "--nproc_per_node", "1", "--master_addr", "127.0.0.1"]
        rendezvous += ["--master_port", free_port()]
        env = {
            **os.environ,
            **OFFLINE_ENV,
            "PYTHONUNBUFFERED": "1",
            "ACCELERATE_USE_CPU": "true",
            "OMP_NUM_THREADS": "1",
        }
        nodes = [
            RunningLaunch(
                [os.path.join(BIN, "torchrun"), *rendezvous, "--node_rank", str(rank), script, *map(str, args)],
                env,
                cwd=REPO,
            )
            for rank in range(nnodes)
        ]
        results = []
        for rank, node in enumerate(nodes):
            results.append(node.finish(timeout=900))
            if results[-1].returncode != 0:
                for other in nodes[rank + 1 :]:  # they would wait for the failed node
                    other.send(signal.SIGKILL)
                raise AssertionError(f"{script} failed on node {rank}:\n{results[-1].output[-6000:]}")
        return results

    def torchrun(self, script, args, nproc=2, check=True):
        """`ACCELERATE_USE_CPU=true torchrun --nproc_per_node N script args...`: DDP over gloo on CPU."""
        command = [os.path.join(BIN, "torchrun"), "--nproc_per_node", str(nproc), "--master_port", free_port(), script]
        result = self._run(command + [str(a) for a in args], {"ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"})
        if check and result.returncode != 0:
            raise AssertionError(f"{script} failed under torchrun ({result.returncode}):\n{result.output[-6000:]}")
        return result


@pytest.fixture(scope="session")
def launch(assets):
    return Launcher(assets)
