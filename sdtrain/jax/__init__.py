"""The JAX adapters: the parts of the machinery that need jax, flax or diffusers' Flax classes."""
