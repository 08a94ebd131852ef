"""The one attention function of the project (DESIGN §5).

flash-attn is used when it is installed, the tensors are on CUDA in half precision and no
mask is given; otherwise PyTorch's ``scaled_dot_product_attention`` (which itself picks a
flash / memory-efficient kernel on GPU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:  # optional extra: pip install .[flash]
    from flash_attn import flash_attn_func as _flash_attn_func
except ImportError:  # pragma: no cover - depends on the machine
    _flash_attn_func = None


def flash_attn_available() -> bool:
    return _flash_attn_func is not None


def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Multi-head scaled dot-product attention.

    Args:
        query: ``B×heads×N×d``.
        key, value: ``B×heads×M×d``.
        attn_mask: optional boolean ``B×1×N×M`` (True = attend) or additive float mask.

    Returns:
        ``B×heads×N×d``.
    """
    use_flash = (
        _flash_attn_func is not None
        and attn_mask is None
        and query.is_cuda
        and query.dtype in (torch.float16, torch.bfloat16)
    )
    if use_flash:
        # flash-attn takes B×N×heads×d
        out = _flash_attn_func(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2))
        return out.transpose(1, 2)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask)
