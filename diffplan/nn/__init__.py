"""Denoising networks. Every one is ``net(x (B, H, D), t (B,) in [0, 1], cond (B, C) | None) -> (B, H, D)``."""
from .ema import EMA
from .embeddings import SinusoidalEmbedding, TimeCondEmbedding
from .mlp import MLPDenoiser, MLPDenoiserConfig
from .transformer import Transformer1d, Transformer1dConfig
from .unet import TemporalUNet, TemporalUNetConfig

__all__ = [
    "EMA", "MLPDenoiser", "MLPDenoiserConfig", "SinusoidalEmbedding", "TemporalUNet", "TemporalUNetConfig",
    "TimeCondEmbedding", "Transformer1d", "Transformer1dConfig",
]
