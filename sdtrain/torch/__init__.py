"""The PyTorch adapters: the parts of the machinery that need torch, diffusers or accelerate."""
