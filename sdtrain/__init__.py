"""The machinery the four training scripts share, one module per topic (see docs/development.md). The scripts import it
from their own folder; no module imports torch, jax, diffusers or accelerate when it is imported, so both the PyTorch
and the JAX environment import it."""
