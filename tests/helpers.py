"""Helpers shared by the test files: command lines, and assertions on saved files."""

import os


def checkpoint_names(output_dir):
    return sorted(
        (n for n in os.listdir(output_dir) if n.startswith("checkpoint-")), key=lambda n: int(n.split("-")[1])
    )


def load_state_dict(folder):
    """The weights of a saved diffusers model folder (unet/, unet_ema/ ...) as a dict of tensors."""
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, "diffusion_pytorch_model.safetensors"))


def max_abs_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def earlier_run_folder(folder):
    """An output folder as a run of these scripts leaves it (its manifest), into which a later run may write."""
    from sdtrain.run_folder import RUN_MANIFEST

    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, RUN_MANIFEST), "w") as f:
        f.write('{"script": "train_text_to_image.py"}\n')
    return folder


def tree_snapshot(folder):
    """Every file under folder with its size and mtime: to prove a failed run wrote nothing over it."""
    snapshot = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            stat = os.stat(path)
            snapshot[os.path.relpath(path, folder)] = (stat.st_size, stat.st_mtime_ns)
    return snapshot
