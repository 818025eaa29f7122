"""diffplan: decision-making and planning with diffusion models."""
__version__ = "0.1.0"
