"""The multi-process flags of the JAX twins: a run of several processes joined by jax.distributed (multi-host TPU
pods, clusters, or several processes on one machine). Framework-free, so parse_args defines and checks them before
JAX loads; sdtrain.jax.loop.start_distributed joins the processes with these values."""

import dataclasses
import os


def add_distributed_arguments(group):
    group.add_argument(
        "--jax_distributed",
        action="store_true",
        help="Call jax.distributed.initialize() first (multi-host TPU pods and clusters).",
    )
    group.add_argument(
        "--coordinator_address",
        type=str,
        default=os.environ.get("JAX_COORDINATOR_ADDRESS"),
        help="host:port where process 0 coordinates a multi-process run (implies --jax_distributed).",
    )
    group.add_argument(
        "--num_processes",
        type=int,
        default=int(os.environ["JAX_NUM_PROCESSES"]) if os.environ.get("JAX_NUM_PROCESSES") else None,
        help="With --coordinator_address: the run's processes, all hosts together (default $JAX_NUM_PROCESSES).",
    )
    group.add_argument(
        "--process_id",
        type=int,
        default=int(os.environ["JAX_PROCESS_ID"]) if os.environ.get("JAX_PROCESS_ID") else None,
        help="With --coordinator_address: this process's index, 0 to --num_processes - 1 (default $JAX_PROCESS_ID).",
    )
    group.add_argument(
        "--heartbeat_timeout_seconds",
        type=int,
        default=100,
        help="With several processes: seconds without a heartbeat before a process counts as dead and the rest stop.",
    )


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """The flags of add_distributed_arguments, built once from the parsed arguments."""

    jax_distributed: bool
    coordinator_address: str | None
    num_processes: int | None
    process_id: int | None
    heartbeat_timeout_seconds: int

    @classmethod
    def from_args(cls, args):
        return cls(**{field.name: getattr(args, field.name) for field in dataclasses.fields(cls)})


def distributed_problem(config):
    """Why the process flags cannot start a run (a message naming the flag), or None."""
    if config.coordinator_address is None:
        return None
    if config.num_processes is None or config.process_id is None:
        return "--coordinator_address needs --num_processes and --process_id (or JAX_NUM_PROCESSES/_PROCESS_ID)"
    if config.num_processes < 1 or not 0 <= config.process_id < config.num_processes:
        return f"--process_id must be in [0, {config.num_processes}), got {config.process_id}"
    return None
