"""The machinery the four training scripts share, one module per topic (see docs/development.md). The scripts import it
from their own folder. The core (sdtrain/*.py) imports no framework, so both the PyTorch and the JAX environment import
it; sdtrain/torch/ and sdtrain/jax/ are the adapters that import theirs."""
