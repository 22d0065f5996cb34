"""The output folder of a run: its lock, checkpoints (listed, checked, published only when complete), the published
pipeline and the choice of checkpoint to resume from. Shared by the four scripts; no framework needed."""

import atexit
import ctypes
import errno
import json
import logging
import math
import os
import re
import shutil
import socket
import tempfile
import time

from sdtrain.cli import UserError

logger = logging.getLogger(__name__)


CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")


# Seed, step and batch layout of a checkpoint, written last into it: its presence marks the checkpoint complete.
CHECKPOINT_METADATA = "checkpoint_metadata.json"


LOCK_FILE = ".training.lock"  # held (an OS lock) by the run writing into output_dir; a killed run holds none


# Written into output_dir when a run first takes it: the folder is ours, and a later run may write into it.
RUN_MANIFEST = ".sdtrain-run.json"


# The folder check_output_dir makes and removes to learn whether a place can be written (<prefix>xxxx.probe): one left
# by a run killed at that instant holds no user's file, and the lock's cleanup removes it.
PROBE_PREFIX = ".sdtrain-"


# Bookkeeping a run writes into output_dir before anything of value: a folder holding only these is still empty.
BOOKKEEPING = (RUN_MANIFEST, LOCK_FILE, LOCK_FILE + ".owner")


PIPELINE_LINK = ".pipeline"  # -> the current .pipeline-<n> folder; output_dir's components link through it


PIPELINE_VERSION = re.compile(r"^\.pipeline-(\d+)$")


def checkpoint_folders(output_dir):
    """Every checkpoint-N folder in output_dir, complete or not, oldest first, as (step, path)."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = CHECKPOINT_PATTERN.match(name)
        if match and os.path.isdir(os.path.join(output_dir, name)):
            found.append((int(match.group(1)), os.path.join(output_dir, name)))
    return sorted(found)


def list_checkpoints(output_dir):
    """Complete checkpoints in output_dir, oldest first, as (step, path)."""
    return [(step, path) for step, path in checkpoint_folders(output_dir) if has_metadata(path)]


def metadata_path(checkpoint_path):
    return os.path.join(checkpoint_path, CHECKPOINT_METADATA)


def has_metadata(checkpoint_path):
    return os.path.isfile(metadata_path(checkpoint_path))


def add_checkpoint_arguments(group):
    """How often checkpoints are written, how many are kept, and which one a run resumes from; the same in all four
    scripts."""
    group.add_argument(
        "--checkpointing_steps",
        type=int,
        default=500,
        help="Save the full training state every this many optimizer updates.",
    )
    group.add_argument(
        "--checkpoints_total_limit",
        type=int,
        default=None,
        help="Keep at most this many checkpoints (the oldest are deleted after a new one is complete).",
    )
    group.add_argument(
        "--resume_from_checkpoint",
        type=str,
        default=None,
        help="Checkpoint folder or name to resume from, or 'latest' (starts fresh if none exists).",
    )


def find_resume_checkpoint(resume_from_checkpoint, output_dir):
    """The checkpoint --resume_from_checkpoint names in output_dir (None to start fresh). 'latest' is the newest intact
    checkpoint: a damaged one is skipped with a warning. A named checkpoint that is missing or damaged is an error."""
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        for _, path in reversed(checkpoint_folders(output_dir)):
            # Every checkpoint these scripts publish holds the file: one without it was copied in part, or made by hand.
            problem = checkpoint_problem(path) if has_metadata(path) else f"{metadata_path(path)} is missing"
            if problem is None:
                return path
            logger.warning(f"skipping {os.path.basename(path)}: {problem}")
        return None
    path = resume_from_checkpoint
    if not os.path.isdir(path):
        path = os.path.join(output_dir, resume_from_checkpoint)
    if not has_metadata(path):
        complete = [os.path.basename(p) for _, p in list_checkpoints(output_dir)]
        raise UserError(
            f"--resume_from_checkpoint {resume_from_checkpoint}: no complete checkpoint at {path} "
            f"({metadata_path(path)} is missing; complete ones in {output_dir}: {complete})"
        )
    problem = checkpoint_problem(path)
    if problem is not None:
        raise UserError(f"--resume_from_checkpoint {resume_from_checkpoint}: {problem}")
    return path


def checkpoint_metadata(run_identity, seed, total_batch_size, updates_per_epoch, num_processes):
    """What every checkpoint of the run records besides its step: what the run trains (run_identity: a checkpoint
    resumes only a run of the same kind), its seed and batch layout, and (information only: the run does not depend
    on it) how many processes trained it."""
    metadata = {"seed": seed, "total_batch_size": total_batch_size, "updates_per_epoch": updates_per_epoch}
    metadata.update(run_identity)
    metadata["process_count"] = num_processes
    return metadata


def read_checkpoint_metadata(checkpoint_path):
    """The metadata save_checkpoint wrote into a checkpoint ({} when there is no checkpoint to resume)."""
    if checkpoint_path is None:
        return {}
    with open(os.path.join(checkpoint_path, CHECKPOINT_METADATA)) as f:
        return json.load(f)


# What a checkpoint was trained as, recorded in its metadata: a checkpoint resumes only a run of the same kind.
RUN_IDENTITY_KEYS = ("script", "placeholder_token", "num_vectors", "lora")


def checkpoint_identity(checkpoint_path, metadata):
    """RUN_IDENTITY_KEYS as the checkpoint's metadata records them. A checkpoint written before they were recorded
    tells its PyTorch script by its files (the learned rows, or the UNet); anything else is not known."""
    identity = {key: metadata[key] for key in RUN_IDENTITY_KEYS if key in metadata}
    if "script" not in identity:
        if os.path.isfile(os.path.join(checkpoint_path, "learned_embeds.safetensors")):
            identity["script"] = "textual_inversion.py"
        elif os.path.isdir(os.path.join(checkpoint_path, "unet")):
            identity["script"] = "train_text_to_image.py"
    if identity.get("script", "").startswith("train_text_to_image") and "lora" not in identity:
        identity["lora"] = None  # written before LoRA runs existed: the whole UNet trained
    return identity


def describe_identity(identity):
    flags = " ".join(f"--{key} {value}" for key, value in identity.items() if key not in ("script", "lora"))
    if "lora" in identity:  # sdtrain.lora.lora_identity: the LoRA flags, or None for the whole UNet
        lora = identity["lora"]
        flags += " (the whole UNet)" if lora is None else "".join(f" --{key} {value}" for key, value in lora.items())
    return " ".join(filter(None, [identity.get("script", "an unknown script"), flags.strip()]))


def check_resume_identity(checkpoint_path, metadata, run_identity):
    """A UserError naming the checkpoint, what it was trained as and what this run is, when they differ in anything
    both know (another script; textual inversion of another placeholder or number of vectors)."""
    recorded = checkpoint_identity(checkpoint_path, metadata)
    if any(key in run_identity and run_identity[key] != value for key, value in recorded.items()):
        raise UserError(
            f"--resume_from_checkpoint: {checkpoint_path} was trained by {describe_identity(recorded)}, this run is "
            f"{describe_identity(run_identity)}: resume it with the same script and flags, or choose another "
            "--output_dir"
        )


def warn_if_batch_layout_changed(resume_metadata, run_metadata):
    """A resume is exact only with the global batch, epoch length and aspect-ratio buckets (where the run records them)
    the checkpoint was written with. The number of processes sharing the global batch may change."""
    layout = ("total_batch_size", "updates_per_epoch", "aspect_ratio_buckets")
    keys = [key for key in layout if key in run_metadata]
    before, now = ({key: metadata.get(key) for key in keys} for metadata in (resume_metadata, run_metadata))
    if before != now:
        logger.warning(
            f"batch layout changed since the checkpoint ({before} -> {now}): "
            "the resumed run will not match an uninterrupted one"
        )


def fsync_folder(folder):
    """Flush a folder's entries (the names created or renamed in it) to disk; a no-op where folders cannot be opened."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # Windows: folders cannot be opened, and its renames are durable
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def umask_file_mode():
    """The mode open() gives a new file: 0666 less the process's umask. Linux says the umask in /proc; elsewhere it is
    read by setting it, which the first call does once, at the start, before other threads write files."""
    try:
        with open("/proc/self/status") as f:
            umask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        umask = os.umask(0o022)
        os.umask(umask)
    return 0o666 & ~umask


FILE_MODE = umask_file_mode()


def flush_file(path):
    """Give a finished file the mode open() would and flush it to disk. safetensors (0.8) creates its files readable
    by their owner only (0600), so a UI or server running as another user could not load what a run wrote."""
    os.chmod(path, FILE_MODE)
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_tree(folder):
    """Flush every file (with flush_file) and folder under `folder` to disk, so that the rename that publishes it can
    never survive a power cut that its bytes did not."""
    for root, _, names in os.walk(folder):
        for name in names:
            flush_file(os.path.join(root, name))
        fsync_folder(root)


def refuse_diverged(bad, loss, what, global_step):
    """The finiteness check's verdict, in both frameworks: `bad` names the tensors about to be written that hold
    non-finite values, `loss` is what the new weights give on the last batch. A FloatingPointError naming the step and
    the culprits when either is wrong, raised before anything is written, so no file ever holds a diverged model."""
    if bad or not math.isfinite(loss):
        culprits = f"non-finite values in {', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}" if bad else ""
        culprits = culprits or f"a loss of {loss} on the last batch"
        raise FloatingPointError(
            f"{what} diverged at step {global_step} ({culprits}): stopping, nothing was written for this step. "
            "Lower --learning_rate, or clip gradients with --max_grad_norm"
        )


def write_failure(what, folder, err):
    """The message for a save that failed (a full disk, most often), with the space left where it was written."""
    free = shutil.disk_usage(folder).free / 2**30 if os.path.isdir(folder) else float("nan")
    return (
        f"could not write {what} into {folder} ({type(err).__name__}: {err}); {free:.2f} GiB free there. "
        "Nothing that was there before was replaced"
    )


def project_version():
    """The version pyproject.toml gives the scripts, for the run manifest ("unknown" where it cannot be read)."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pyproject.toml")
    try:
        with open(path) as f:
            match = re.search(r'^version\s*=\s*"([^"]+)"', f.read(), re.MULTILINE)
    except OSError:
        match = None
    return match.group(1) if match else "unknown"


def made_by_a_run(output_dir, names):
    """Whether the folder with these entries is one our runs write into: it carries the run manifest, or the lock of
    a run of an earlier version, or a complete checkpoint (copied in to resume from)."""
    if RUN_MANIFEST in names or LOCK_FILE in names:
        return True
    return any(CHECKPOINT_PATTERN.match(name) for name in names) and bool(list_checkpoints(output_dir))


def held_by_a_live_run(output_dir):
    """The pid (as its owner file says) of the live run holding output_dir's lock, or None: probed with a shared OS
    lock on a read-only handle, so that the check writes nothing."""
    try:
        import fcntl
    except ImportError:
        return None  # Windows: lock_output_dir refuses it when the run takes the folder
    try:
        descriptor = os.open(os.path.join(output_dir, LOCK_FILE), os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(descriptor, fcntl.LOCK_UN)
        return None
    except OSError:
        owner_path = os.path.join(output_dir, LOCK_FILE + ".owner")
        return open(owner_path).read().strip() if os.path.isfile(owner_path) else "unknown"
    finally:
        os.close(descriptor)


def in_use_error(output_dir, owner):
    return UserError(
        f"--output_dir {output_dir} is in use by another training run (pid {owner}): wait for it to end, "
        "stop it, or choose another --output_dir"
    )


def nearest_existing(path):
    """path itself, or its closest ancestor that exists."""
    path = os.path.abspath(path)
    while not os.path.lexists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def check_output_dir(output_dir, model_folders):
    """Refuse, before any model loads and writing nothing, an --output_dir a run must not write into: a file, a
    folder that holds anything but what our runs write (so that no user file is ever deleted or replaced), the
    folder of a model the run reads (model_folders: {flag: path}, local folders only), a live run's folder, or a
    place that cannot be written. Main process only."""
    real = os.path.realpath(output_dir)
    for flag, model_path in model_folders.items():
        if not model_path or not os.path.isdir(model_path):
            continue  # a Hub name: nothing local to overwrite
        model = os.path.realpath(model_path)
        if real == model or real.startswith(model + os.sep) or model.startswith(real + os.sep):
            raise UserError(
                f"--output_dir {output_dir} is, contains or lies inside {flag} {model_path}: training would write "
                "over the model it reads. Choose another --output_dir"
            )
    if os.path.lexists(output_dir) and not os.path.isdir(output_dir):
        raise UserError(f"--output_dir {output_dir} is a file, not a folder: choose another --output_dir")
    if os.path.isdir(output_dir):
        names = sorted(n for n in os.listdir(output_dir) if not (n.startswith(PROBE_PREFIX) and n.endswith(".probe")))
        if names and not made_by_a_run(output_dir, names):
            shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            raise UserError(
                f"--output_dir {output_dir} holds files no run of these scripts wrote ({shown}): a run would write "
                "over them. Empty it, or choose another --output_dir"
            )
        owner = held_by_a_live_run(output_dir)
        if owner is not None:
            raise in_use_error(output_dir, owner)
    existing = nearest_existing(output_dir)
    where = f"--output_dir {output_dir}" + ("" if existing == os.path.abspath(output_dir) else f" (in {existing})")
    if not os.path.isdir(existing):
        raise UserError(
            f"{where}: {existing} is a file, so no folder can be made under it: choose another --output_dir"
        )
    for top in ("/proc", "/sys"):
        if real == top or real.startswith(top + os.sep):
            raise UserError(f"{where} lies in {top}, a virtual file system of the kernel: choose another --output_dir")
    try:  # the one sure test (read-only mounts, permissions, root or not): make a folder there and remove it
        os.rmdir(tempfile.mkdtemp(prefix=PROBE_PREFIX, suffix=".probe", dir=existing))
    except OSError as err:
        reason = "a read-only file system" if err.errno == errno.EROFS else err.strerror or type(err).__name__
        raise UserError(f"{where} cannot be written ({reason}): choose another --output_dir") from None


# What joins several processes into one run, by framework; the commands are in docs/distributed.md.
HOW_TO_JOIN = {
    "accelerate": "without GPUs, tell accelerate to join them on the CPU: ACCELERATE_USE_CPU=true accelerate launch "
    "--multi_gpu --num_processes 2 ... (accelerate launch --cpu starts one process only)",
    "jax": "start each process with --coordinator_address HOST:PORT --num_processes N --process_id I (or "
    "--jax_distributed where JAX finds them itself), not with torchrun or accelerate launch",
}


def check_process_group(num_processes, environ, framework):
    """Refuse processes a launcher started as several (WORLD_SIZE or JAX_NUM_PROCESSES above 1, or a rank) that the
    framework sees as one each: they formed no distributed group, so each would train alone as the main process,
    and the second would be refused by the first one's lock."""
    sizes, ranks = ["WORLD_SIZE"], ["RANK", "LOCAL_RANK"]
    if framework == "jax":  # what --jax_distributed reads (JAX's own variables), passed without it
        sizes, ranks = sizes + ["JAX_NUM_PROCESSES"], ranks + ["JAX_PROCESS_ID"]
    said = {name: environ[name] for name in sizes + ranks if environ.get(name)}
    several = any(said.get(name, "1") not in ("0", "1") for name in sizes)
    if num_processes == 1 and (several or any(said.get(name, "0") != "0" for name in ranks)):
        shown = ", ".join(f"{name}={value}" for name, value in said.items())
        raise UserError(
            f"the launcher started several processes ({shown}) but they formed no distributed group: each would "
            f"train alone, as the main process. {HOW_TO_JOIN[framework][0].upper()}{HOW_TO_JOIN[framework][1:]}. "
            "See docs/distributed.md"
        )


def take_output_dir(output_dir, script, disposable=()):
    """Make output_dir (if absent), take its lock (lock_output_dir) and write the run manifest if it has none: called
    once models and data are loaded and checked, just before training, so that a run refused earlier writes nothing.
    A folder this run made is removed again when the process ends with nothing of value in it: only bookkeeping,
    unfinished saves, and the `disposable` entries (the tracker's log folder). Main process only; returns the lock."""
    created = not os.path.isdir(output_dir)
    os.makedirs(output_dir, exist_ok=True)
    lock = lock_output_dir(output_dir)
    manifest = os.path.join(output_dir, RUN_MANIFEST)
    if not os.path.isfile(manifest):
        with open(manifest, "w") as f:
            started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            json.dump({"script": script, "started": started, "version": project_version()}, f, indent=2)
    if created:
        relative = [os.path.normpath(name).split(os.sep)[0] for name in disposable if not os.path.isabs(name)]
        atexit.register(remove_if_worthless, output_dir, (*BOOKKEEPING, *relative))
    return lock


def remove_if_worthless(output_dir, disposable):
    """Remove output_dir if it holds nothing but `disposable` entries and unfinished saves."""
    try:
        names = os.listdir(output_dir)
    except OSError:
        return
    if all(name in disposable or name.endswith(".partial") for name in names):
        shutil.rmtree(output_dir, ignore_errors=True)


def final_save_error(output_dir, global_step, err, write_checkpoint, why_not=None):
    """The UserError to raise when the final save failed (a full disk, most often), after keeping what was trained:
    what the save left unfinished is removed to free space, then write_checkpoint() writes checkpoint-<global_step>
    (unless it exists), so a relaunch with --resume_from_checkpoint latest trains nothing and only saves. Where no
    checkpoint can be written now, write_checkpoint is None and why_not says why."""
    for name in os.listdir(output_dir):
        if name.endswith(".partial"):
            path = os.path.join(output_dir, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    free = shutil.disk_usage(output_dir).free / 2**30
    failed = f"the final save into {output_dir} failed ({type(err).__name__}: {err}); {free:.2f} GiB free there"
    checkpoint = f"checkpoint-{global_step}"
    lost = "the steps since the last checkpoint are lost. Free space and relaunch with --resume_from_checkpoint latest"
    if global_step not in dict(list_checkpoints(output_dir)):
        if write_checkpoint is None:
            return UserError(f"{failed}. {checkpoint} cannot be written now ({why_not}): {lost}")
        try:
            write_checkpoint()
        except OSError as checkpoint_err:
            return UserError(f"{failed}. {checkpoint} could not be written either ({checkpoint_err}): {lost}")
    return UserError(
        f"{failed}. What was trained is in {os.path.join(output_dir, checkpoint)}: free space and relaunch the same "
        "command with --resume_from_checkpoint latest, which saves without training"
    )


def lock_output_dir(output_dir):
    """Hold an OS lock on output_dir for the whole run, so that a second run into the same folder is refused instead
    of overwriting this run's checkpoints and model. The kernel drops the lock when the process ends, however it
    ends, so the lock of a killed run is simply taken over. Then clear what a killed run may have left: unfinished
    checkpoints and pipelines, and replaced ones not yet deleted. Main process only."""
    import filelock

    os.makedirs(output_dir, exist_ok=True)
    lock = filelock.FileLock(os.path.join(output_dir, LOCK_FILE), timeout=0)
    owner_path = os.path.join(output_dir, LOCK_FILE + ".owner")
    try:
        lock.acquire()
    except filelock.Timeout:
        owner = open(owner_path).read().strip() if os.path.isfile(owner_path) else "unknown"
        raise in_use_error(output_dir, owner) from None
    with open(owner_path, "w") as f:
        f.write(f"{os.getpid()} on {socket.gethostname()}\n")
    link = os.path.join(output_dir, PIPELINE_LINK)
    current = os.readlink(link) if os.path.islink(link) else None
    for name in os.listdir(output_dir):
        unfinished = name.endswith((".partial", ".stale", ".link", ".link.old", ".new", ".probe"))
        if unfinished or (PIPELINE_VERSION.match(name) and name != current):
            path = os.path.join(output_dir, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.remove(path)
    return lock


def checkpoint_problem(checkpoint_path):
    """Why a checkpoint cannot be resumed from, naming the file, or None. Its metadata lists every file it holds with
    its size, so a truncated or missing file is found without reading the weights."""
    metadata_path = os.path.join(checkpoint_path, CHECKPOINT_METADATA)
    try:
        with open(metadata_path) as f:
            metadata = json.load(f)
        int(metadata["global_step"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"{metadata_path} is unreadable ({type(err).__name__}: {err})"
    for name, size in metadata.get("files", {}).items():
        path = os.path.join(checkpoint_path, name)
        if not os.path.isfile(path):
            return f"{path} is missing"
        if os.path.getsize(path) != size:
            return f"{path} is damaged: {os.path.getsize(path)} bytes, {size} were written"
    return None


def write_checkpoint_metadata(folder, metadata):
    """Write the metadata file, last, with every file of the checkpoint and its size; then flush it all to disk."""
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            files[os.path.relpath(os.path.join(root, name), folder)] = os.path.getsize(os.path.join(root, name))
    with open(os.path.join(folder, CHECKPOINT_METADATA), "w") as f:
        json.dump({**metadata, "files": files}, f, indent=2)
    fsync_tree(folder)


def publish_checkpoint(partial_path, final_path):
    """Make a complete checkpoint visible under its final name with one rename; one of the same step left by an
    earlier run is replaced."""
    stale_path = final_path + ".stale"
    shutil.rmtree(stale_path, ignore_errors=True)
    if os.path.exists(final_path):
        os.rename(final_path, stale_path)
    os.rename(partial_path, final_path)
    fsync_folder(os.path.dirname(final_path))
    shutil.rmtree(stale_path, ignore_errors=True)


def exchange_entries(path_a, path_b):
    """Swap two directory entries in one atomic step (Linux's renameat2 with RENAME_EXCHANGE); False where the
    system or the filesystem cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    here, rename_exchange = -100, 2  # AT_FDCWD (paths are absolute or relative to the working folder)
    return renameat2(here, os.fsencode(path_a), here, os.fsencode(path_b), rename_exchange) == 0


def point_link(link, target):
    """Point the symbolic link `link` at `target` in one atomic step: a new link renamed over the old one."""
    temporary = link + ".new"
    if os.path.lexists(temporary):
        os.remove(temporary)
    os.symlink(target, temporary)
    os.replace(temporary, link)
    fsync_folder(os.path.dirname(link))


def link_component(output_dir, name):
    """Make output_dir/<name> the relative link .pipeline/<name>. A real file is replaced by its link in one rename;
    a real folder is swapped with it in one exchange (or, where the system cannot, moved aside first)."""
    path, target = os.path.join(output_dir, name), os.path.join(PIPELINE_LINK, name)
    if os.path.islink(path) and os.readlink(path) == target:
        return
    temporary = os.path.join(output_dir, f".{name}.link")
    if os.path.lexists(temporary):
        os.remove(temporary)
    os.symlink(target, temporary)
    if os.path.isdir(path) and not os.path.islink(path):
        if not exchange_entries(temporary, path):
            os.rename(path, temporary + ".old")
            os.rename(temporary, path)
            temporary += ".old"
        shutil.rmtree(temporary)
    else:
        os.replace(temporary, path)


def next_pipeline_version(output_dir):
    numbers = [int(match.group(1)) for match in map(PIPELINE_VERSION.match, os.listdir(output_dir)) if match]
    return f".pipeline-{max(numbers, default=0) + 1}"


def publish_pipeline(partial, output_dir):
    """Make the complete pipeline in the folder `partial` the one output_dir holds, atomically. It becomes a hidden
    version folder .pipeline-<n>; every component in output_dir (model_index.json, unet/, ...) is a relative link
    through the link .pipeline; and one rename, pointing .pipeline at the new version, switches them all. So at every
    instant, crash or not, from_pretrained(output_dir) loads the old pipeline or the new one. Where symbolic links
    cannot be made (Windows without developer mode), components are moved in one at a time, with a warning."""
    fsync_tree(partial)
    link = os.path.join(output_dir, PIPELINE_LINK)
    components = sorted(os.listdir(partial))
    try:
        os.symlink(PIPELINE_LINK, link + ".probe")
        os.remove(link + ".probe")
    except (OSError, NotImplementedError):
        logger.warning(f"no symbolic links in {output_dir}: the pipeline is replaced one component at a time")
        for name in components:
            target = os.path.join(output_dir, name)
            if os.path.isdir(target):
                shutil.rmtree(target)
            os.replace(os.path.join(partial, name), target)
        os.rmdir(partial)
        return
    shown = [name for name in components if os.path.lexists(os.path.join(output_dir, name))]
    if any(not os.path.islink(os.path.join(output_dir, name)) for name in shown):
        # Saved as real files and folders (by an older version, or by diffusers' own script): a snapshot of what
        # output_dir shows now (hard links, no extra space) first becomes the current version, entry for entry.
        snapshot = os.path.join(output_dir, next_pipeline_version(output_dir))
        os.makedirs(snapshot)
        for name in shown:
            source = os.path.join(output_dir, name)
            if os.path.isdir(source):
                shutil.copytree(source, os.path.join(snapshot, name), copy_function=os.link)
            else:
                os.link(source, os.path.join(snapshot, name))
        fsync_tree(snapshot)
        point_link(link, os.path.basename(snapshot))
    previous = os.readlink(link) if os.path.islink(link) else None
    for name in components:  # a link to a component the current version lacks points nowhere until the switch
        link_component(output_dir, name)
    version = next_pipeline_version(output_dir)
    os.rename(partial, os.path.join(output_dir, version))
    fsync_folder(output_dir)
    point_link(link, version)  # the one step that switches every component
    for name in os.listdir(output_dir):  # links to components the new pipeline does not have
        path = os.path.join(output_dir, name)
        if os.path.islink(path) and os.readlink(path).startswith(PIPELINE_LINK + os.sep) and not os.path.exists(path):
            os.remove(path)
    if previous is not None and previous != version:
        shutil.rmtree(os.path.join(output_dir, previous), ignore_errors=True)
