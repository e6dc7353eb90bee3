"""opendit: train and sample DiT (Diffusion Transformers) with plain PyTorch."""

__version__ = "0.1.0"
