"""One seed drives every draw of a run: --seed (or a drawn one, recorded in every checkpoint), and the well-mixed
seeds derived from it by integer keys, so a resumed run draws exactly what an uninterrupted one would have drawn."""

import logging

import numpy as np

logger = logging.getLogger(__name__)


# The second key of every validation seed, derive_seed(seed, VALIDATION_SEED_KEY, prompt index): training draws use
# four keys, so a validation image never shares its noise with a training step.
VALIDATION_SEED_KEY = 7919


def add_seed_argument(group):
    group.add_argument(
        "--seed",
        type=int,
        default=None,
        help="Seed for data order, augmentation and noise; a resumed run reuses its checkpoint's seed.",
    )


def derive_seed(*keys):
    """A well-mixed 63-bit seed from integer keys. All randomness is a pure function of such keys, so a resumed
    run draws exactly what an uninterrupted run would have drawn, whatever the number of workers."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def draw_seed():
    """A fresh seed for a run started without --seed. A multi-process run must use process 0's draw on every process
    (the scripts broadcast it): each process drawing its own would shuffle and noise differently."""
    return int(np.random.SeedSequence().generate_state(1)[0])


def choose_seed(seed_flag, resume_metadata, drawn_seed):
    """One seed drives every draw: --seed (seed_flag); without it, the seed a resumed checkpoint recorded, or for a
    new run drawn_seed (draw_seed() of process 0, the same on every process), which its checkpoints record."""
    if seed_flag is not None:
        seed = seed_flag
    else:
        seed = resume_metadata.get("seed", drawn_seed)
    if resume_metadata and resume_metadata["seed"] != seed:
        logger.warning(
            f"--seed {seed} differs from the checkpoint's seed {resume_metadata['seed']}: "
            "the resumed run will not match an uninterrupted one"
        )
    return seed
