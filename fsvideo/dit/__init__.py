"""Base DiT of FSVideo (spec §2.3): Wan2.1-I2V blocks with Layer Memory self-attention.

Public API:
    DiTConfig                       fsvideo.dit.config       presets tiny() / paper() / wan_i2v_14b()
    DiT                             fsvideo.dit.model        forward(latent_in, sigma, text_tokens, image_tokens, ...)
    FrameCondition, image_to_video, text_to_image, build_i2v_condition, fold_frame_mask   fsvideo.dit.condition
    LayerMemoryRouter, router_heatmap   fsvideo.dit.layer_memory
"""

from fsvideo.dit.condition import (
    FrameCondition,
    build_i2v_condition,
    fold_frame_mask,
    image_to_video,
    text_to_image,
)
from fsvideo.dit.config import DiTConfig
from fsvideo.dit.layer_memory import LayerMemoryRouter, router_heatmap
from fsvideo.dit.model import DiT

__all__ = [
    "DiT",
    "FrameCondition",
    "DiTConfig",
    "LayerMemoryRouter",
    "build_i2v_condition",
    "fold_frame_mask",
    "image_to_video",
    "router_heatmap",
    "text_to_image",
]
