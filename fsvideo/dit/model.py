"""The FSVideo base DiT (spec §2.3): Wan2.1-I2V structure with Layer Memory self-attention.

Public API:
    DiT(config)
        forward(latent_in, sigma, text_tokens, image_tokens=None, text_mask=None,
                return_router_weights=False) -> velocity ``B×C×t×h×w``
                (or ``(velocity, router_maxima)`` with ``return_router_weights=True``)
        init_weights()     (re-)initialise every parameter; call after ``to_empty`` on a meta-built model
        routers            the Layer Memory routers, blocks 2 … L (empty without Layer Memory)
        blocks             the transformer blocks, which ``fsvideo.parallel`` checkpoints, compiles and shards
        sequence_parallel  None, or the context-parallel hook ``fsvideo.parallel`` sets (with each self-attention's):
                           the forward then runs on this rank's share of the tokens and gathers the output

Timestep convention: ``sigma`` is the flow-matching noise level in [0, 1] (σ = 1 is pure noise,
``fsvideo.flow``); the model embeds ``σ·config.timestep_scale`` (1000, Wan's timestep).

Meta-device build::

    with torch.device("meta"):
        model = DiT(config)
    model.to_empty(device="cuda")
    model.init_weights()
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from fsvideo.dit.block import DiTBlock
from fsvideo.dit.config import DiTConfig
from fsvideo.dit.embeddings import ImageEmbedding, TextEmbedding, TimestepEmbedding
from fsvideo.dit.layer_memory import LayerMemoryRouter
from fsvideo.dit.norms import FP32LayerNorm
from fsvideo.dit.rope import rope_rotations
from fsvideo.pretrained import PretrainedNetwork

if TYPE_CHECKING:
    from fsvideo.parallel import UlyssesSequenceParallel


class DiTHead(nn.Module):
    """LayerNorm → modulate with (learned 1×2×dim table + time embedding) → Linear to patch pixels."""

    def __init__(self, dim: int, out_features: int, eps: float) -> None:
        super().__init__()
        self.norm = FP32LayerNorm(dim, eps, affine=False)
        self.proj = nn.Linear(dim, out_features)
        self.modulation = nn.Parameter(torch.empty(1, 2, dim))

    def forward(self, x: torch.Tensor, time_emb: torch.Tensor) -> torch.Tensor:
        """x: ``B×N×dim``; time_emb: ``B×dim`` float32 → ``B×N×out_features``."""
        shift, scale = (self.modulation.float() + time_emb[:, None]).unbind(1)
        return self.proj((self.norm(x.float()) * (1 + scale[:, None]) + shift[:, None]).type_as(x))


class DiT(PretrainedNetwork, nn.Module):
    config_class = DiTConfig

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        self.config = config
        self.patch_embed = nn.Conv3d(
            config.in_channels, config.dim, kernel_size=config.patch_size, stride=config.patch_size
        )
        self.time_embed = TimestepEmbedding(config.freq_dim, config.dim)
        self.text_embed = TextEmbedding(config.text_dim, config.dim)
        self.image_embed = (
            ImageEmbedding(config.image_dim, config.dim) if config.image_dim is not None else None
        )
        self.blocks = nn.ModuleList(DiTBlock(config, index) for index in range(1, config.num_layers + 1))
        self.head = DiTHead(config.dim, config.out_channels * config.patch_volume, config.eps)
        self.sequence_parallel: UlyssesSequenceParallel | None = None
        """Set from outside (``fsvideo.parallel.apply_context_parallel``) to run context-parallel."""
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Wan's initialisation; the output projection starts at zero, router gates at 0 (the plain DiT).

        The routers' own ``init_weights`` draws no random numbers, so a DiT with Layer Memory and one
        without, built from the same seed, share every other weight: the same function at init, which
        makes on / off comparisons paired (Figure 7).
        """
        routers = {id(module) for router in self.routers for module in router.modules()}
        for module in self.modules():
            if isinstance(module, nn.Linear) and id(module) not in routers:
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm | nn.RMSNorm):
                module.reset_parameters()
        nn.init.xavier_uniform_(self.patch_embed.weight.flatten(1))
        nn.init.zeros_(self.patch_embed.bias)
        for linear in (
            self.text_embed.linear_1,
            self.text_embed.linear_2,
            self.time_embed.linear_1,
            self.time_embed.linear_2,
        ):
            nn.init.normal_(linear.weight, std=0.02)
        for block in self.blocks:
            nn.init.normal_(block.modulation, std=self.config.dim**-0.5)
            if block.router is not None:
                block.router.init_weights()
        nn.init.normal_(self.head.modulation, std=self.config.dim**-0.5)
        nn.init.zeros_(self.head.proj.weight)

    @property
    def routers(self) -> list[LayerMemoryRouter]:
        return [block.router for block in self.blocks if block.router is not None]

    def _check_inputs(
        self,
        latent_in: torch.Tensor,
        sigma: torch.Tensor,
        text_tokens: torch.Tensor,
        image_tokens: torch.Tensor | None,
    ) -> None:
        cfg = self.config
        if latent_in.ndim != 5 or latent_in.shape[1] != cfg.in_channels:
            raise ValueError(
                f"latent_in must be B×{cfg.in_channels}×t×h×w (noise {cfg.latent_channels} + mask "
                f"{cfg.mask_channels} + condition {cfg.latent_channels}), got {tuple(latent_in.shape)}"
            )
        if any(size % p for size, p in zip(latent_in.shape[2:], cfg.patch_size)):
            raise ValueError(
                f"latent size t×h×w = {tuple(latent_in.shape[2:])} must be divisible by patch {cfg.patch_size}"
            )
        batch = latent_in.shape[0]
        if sigma.shape != (batch,):
            raise ValueError(f"sigma must have shape ({batch},), got {tuple(sigma.shape)}")
        if text_tokens.ndim != 3 or text_tokens.shape[0] != batch or text_tokens.shape[2] != cfg.text_dim:
            raise ValueError(f"text_tokens must be {batch}×L×{cfg.text_dim}, got {tuple(text_tokens.shape)}")
        if cfg.image_dim is None and image_tokens is not None:
            raise ValueError("this DiT has no image branch (image_dim=None); do not pass image_tokens")
        if cfg.image_dim is not None and (
            image_tokens is None or image_tokens.shape[0] != batch or image_tokens.shape[-1] != cfg.image_dim
        ):
            got = None if image_tokens is None else tuple(image_tokens.shape)
            raise ValueError(
                f"image_tokens must be {batch}×M×{cfg.image_dim} (zeros to drop the image condition), got {got}"
            )

    def forward(
        self,
        latent_in: torch.Tensor,
        sigma: torch.Tensor,
        text_tokens: torch.Tensor,
        image_tokens: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        return_router_weights: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Predict the flow velocity ``ε − z0``.

        Args:
            latent_in: ``B×(2C+k)×t×h×w`` = cat(noisy latent, mask, condition latent), see
                ``fsvideo.dit.condition.build_i2v_condition``.
            sigma: ``B`` noise levels in [0, 1].
            text_tokens: ``B×L×text_dim``; text_mask: optional ``B×L`` bool (True = real token).
            image_tokens: ``B×M×image_dim`` (CLIP penultimate states), required iff ``image_dim`` is set.
            return_router_weights: also return, per routed block (l = 2 … L), the max over tokens of
                each source's router weight, ``B×l`` (detached; for ``router_heatmap``).

        Returns:
            velocity ``B×C×t×h×w`` in the dtype of the parameters, or ``(velocity, router_maxima)``.
        """
        cfg = self.config
        self._check_inputs(latent_in, sigma, text_tokens, image_tokens)
        batch, _, frames, height, width = latent_in.shape
        pt, ph, pw = cfg.patch_size
        grid = (frames // pt, height // ph, width // pw)

        # 1. patchify and rotary table; context parallel keeps this rank's run of N_r tokens, while the table
        # stays whole: it tells self-attention N, and each self-attention takes its rows (a view)
        x = self.patch_embed(latent_in).flatten(2).transpose(1, 2).contiguous()  # (B, N, dim)
        rotations = rope_rotations(grid, cfg.head_dim, cfg.rope_theta, x.device)  # (N, hd/2) complex
        num_tokens = x.shape[1]
        sequence_parallel = self.sequence_parallel
        if sequence_parallel is not None:
            x = sequence_parallel.shard_tokens(x)  # (B, N_r, dim)

        # 2. condition embeddings
        time_emb, time_modulation = self.time_embed(sigma * cfg.timestep_scale)
        text = self.text_embed(text_tokens)
        text_mask = None if text_mask is None else text_mask.to(torch.bool)
        image = self.image_embed(image_tokens) if self.image_embed is not None else None

        # 3. blocks; the history X_0 … X_l feeds the Layer Memory routers
        history = [x] if cfg.layer_memory else None
        router_maxima = []
        for block in self.blocks:
            # a snapshot of the list: activation checkpointing (fsvideo.parallel) recomputes a block with the
            # arguments it was given, which must not see the states appended after it
            snapshot = None if history is None else list(history)
            x, router_max = block(
                x, time_modulation, text, text_mask, image, rotations, snapshot, return_router_weights
            )
            if history is not None:
                history.append(x)
            if router_max is not None:
                if sequence_parallel is not None:  # the max over this rank's tokens → over all tokens
                    router_max = sequence_parallel.max_over_ranks(router_max)
                router_maxima.append(router_max)

        # 4. head (per token, so on this rank's share: cp times less to gather than before it) and unpatchify
        out = self.head(x, time_emb)  # (B, N, pt·ph·pw·C); N_r tokens under context parallel
        if sequence_parallel is not None:
            out = sequence_parallel.gather_tokens(out, num_tokens)  # (B, N_r, ·) of every rank → (B, N, ·)
        out = out.reshape(batch, *grid, pt, ph, pw, cfg.out_channels)
        out = out.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(batch, cfg.out_channels, frames, height, width)
        if return_router_weights:
            return out, router_maxima
        return out
