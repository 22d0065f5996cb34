"""Fixed-seed runs of the four scripts on the tiny SD and SDXL pipelines, and a SHA-256 of every file they write that
holds weights or pixels: to prove a refactor changed nothing a user gets, compare the digests of a run before and
after it, byte for byte.

    .venv/bin/python devkit/weight_digests.py --work /tmp/digests-before --output before.json
    ... change the code ...
    .venv/bin/python devkit/weight_digests.py --work /tmp/digests-after --output after.json
    .venv/bin/python devkit/weight_digests.py --compare before.json after.json

The PyTorch scripts run under `accelerate launch` in .venv, the Flax twins with .venv-flax's python on two host
devices, all offline. Each run uses recipes, validation images and the single-file export, so those paths are
compared too. Checkpoint folders are left out: they record times and library versions. The tiny pipelines and data
are built once in --assets, a fixed folder, because saved configs and single-file metadata record the base model's
path; a .safetensors file is digested as its header (keys sorted: safetensors writes its metadata in no fixed order)
and its tensor bytes."""

import argparse
import hashlib
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCH_BIN = os.path.join(REPO, ".venv", "bin")
FLAX_PYTHON = os.path.join(REPO, ".venv-flax", "bin", "python")
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "OMP_NUM_THREADS": "1",
}
FLAX_XLA_FLAGS = "--xla_force_host_platform_device_count=2"
DIGESTED = (".safetensors", ".bin", ".msgpack", ".png", ".ckpt", ".json")
TORCH_ONLY_FLAGS = "--report_to none"

T2I_FLAGS = (
    "--resolution 64 --train_batch_size 2 --learning_rate 1e-3 --lr_warmup_steps 0 --seed 7 --max_train_steps 4"
    " --checkpointing_steps 2 --random_flip --proportion_empty_prompts 0.3 --snr_gamma 5"
    " --validation_prompts 'a red circle' --validation_epochs 1 --save_single_file"
)
TI_FLAGS = (
    "--placeholder_token <blob> --initializer_token circle --num_vectors 2 --resolution 64 --repeats 2"
    " --train_batch_size 2 --learning_rate 5e-2 --lr_warmup_steps 0 --seed 5 --max_train_steps 4 --save_steps 2"
    " --checkpointing_steps 2 --validation_prompt 'a <blob>' --validation_steps 2"
)
RUNS = {
    "train_text_to_image.py": ("images", T2I_FLAGS),
    "textual_inversion.py": ("concept", TI_FLAGS),
    "train_text_to_image_flax.py": ("images", T2I_FLAGS),
    "textual_inversion_flax.py": ("concept", TI_FLAGS),
}


def build_assets(folder):
    """The tiny pipelines and data, built once: a lock lets runs started side by side share them."""
    import fcntl

    from devkit import tiny_sd

    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.exists(os.path.join(folder, "built")):
            tiny_sd.build_tiny_pipeline(os.path.join(folder, "sd"))
            tiny_sd.build_tiny_sdxl_pipeline(os.path.join(folder, "sdxl"))
            tiny_sd.write_imagefolder(os.path.join(folder, "images"), num_images=8, size=72)
            tiny_sd.write_concept_folder(os.path.join(folder, "concept"), num_images=4, size=72)
            open(os.path.join(folder, "built"), "w").close()
    return {name: os.path.join(folder, name) for name in ("sd", "sdxl", "images", "concept")}


def launch(script, arguments, log_path):
    import shlex

    env = {**os.environ, **OFFLINE_ENV, "PYTHONUNBUFFERED": "1"}
    if script.endswith("_flax.py"):
        command = [FLAX_PYTHON, script]
        env["XLA_FLAGS"] = FLAX_XLA_FLAGS
    else:
        command = [os.path.join(TORCH_BIN, "accelerate"), "launch", "--num_processes", "1", "--cpu", script]
        command[2:2] = ["--mixed_precision", "no", "--num_machines", "1", "--dynamo_backend", "no"]
    with open(log_path, "w") as log:
        result = subprocess.run(command + arguments, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        sys.exit(f"{script} failed ({result.returncode}): see {log_path} ({shlex.join(command + arguments)})")


def file_digest(path):
    with open(path, "rb") as f:
        content = f.read()
    if path.endswith(".safetensors"):
        header_size = int.from_bytes(content[:8], "little")
        header = json.loads(content[8 : 8 + header_size])
        content = json.dumps(header, sort_keys=True).encode() + content[8 + header_size :]
    return hashlib.sha256(content).hexdigest()


def digests(folder):
    found = {}
    for root, dirs, files in os.walk(folder, followlinks=True):  # the pipeline's components link into .pipeline-N
        dirs[:] = [d for d in dirs if not d.startswith(("checkpoint-", "."))]
        for name in files:
            if name.endswith(DIGESTED) and not name.startswith("."):  # the manifest records when the run started
                path = os.path.join(root, name)
                found[os.path.relpath(path, folder)] = file_digest(path)
    return dict(sorted(found.items()))


def run_all(work, assets, only):
    from devkit.command_line import command_line

    paths = build_assets(assets)
    results = {}
    for script, (data, flags) in RUNS.items():
        for family in ("sd", "sdxl"):
            name = f"{script}:{family}"
            if only and not any(part in name for part in only):
                continue
            out = os.path.join(work, "runs", script.replace(".py", ""), family)
            if os.path.exists(out):
                subprocess.run(["rm", "-rf", out], check=True)
            arguments = command_line(
                "--pretrained_model_name_or_path", paths[family], "--train_data_dir", paths[data], "--output_dir", out
            )
            arguments += command_line(flags if script.endswith("_flax.py") else f"{flags} {TORCH_ONLY_FLAGS}")
            os.makedirs(os.path.dirname(out), exist_ok=True)
            print(f"{name} ...", flush=True)
            launch(script, arguments, out + ".log")
            results[name] = digests(out)
            print(f"{name}: {len(results[name])} files", flush=True)
    return results


def compare(before_path, after_path):
    """Every file of a run before is byte-identical after; files only the later run writes are listed as added."""
    with open(before_path) as f:
        before = json.load(f)
    with open(after_path) as f:
        after = json.load(f)
    differences = 0
    for run in sorted(set(before) & set(after)):
        a, b = (
            {name: digest for name, digest in files.items() if not os.path.basename(name).startswith(".")}
            for files in (before[run], after[run])
        )
        for name in sorted(set(a) | set(b)):
            if name not in a:
                print(f"ADDED {run} {name}")
            elif a[name] != b.get(name):
                differences += 1
                print(f"DIFFERENT {run} {name}: {a[name][:12]} -> {b.get(name, 'missing')[:12]}")
        print(f"{run}: {len(a)} files before, {len(b)} after")
    print("identical" if not differences else f"{differences} files differ")
    return 1 if differences else 0


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", help="where the runs go")
    parser.add_argument("--assets", default="/tmp/sdtrain-weight-digests-assets", help="the tiny pipelines and data")
    parser.add_argument("--output", help="the JSON file of digests to write")
    parser.add_argument("--only", nargs="*", help="run only these (substrings of 'script:family')")
    parser.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"))
    args = parser.parse_args()
    if args.compare:
        sys.exit(compare(*args.compare))
    results = run_all(os.path.abspath(args.work), os.path.abspath(args.assets), args.only)
    with open(args.output, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
