"""Base DiT of FSVideo (spec §2.3): Wan2.1-I2V blocks with Layer Memory self-attention.

Public API:
    DiTConfig                       fsvideo.dit.config       presets tiny() / paper() / wan_i2v_14b()
    DiT                             fsvideo.dit.model        forward(latent_in, sigma, text_tokens, image_tokens, ...)
    build_i2v_condition, fold_frame_mask   fsvideo.dit.condition
    LayerMemoryRouter, router_heatmap   fsvideo.dit.layer_memory
"""

from fsvideo.dit.condition import build_i2v_condition, fold_frame_mask
from fsvideo.dit.config import DiTConfig
from fsvideo.dit.layer_memory import LayerMemoryRouter, router_heatmap
from fsvideo.dit.model import DiT

__all__ = [
    "DiT",
    "DiTConfig",
    "LayerMemoryRouter",
    "build_i2v_condition",
    "fold_frame_mask",
    "router_heatmap",
]
