"""Tiny random reward backbones for tests and CPU demos: the real transformers classes at toy sizes.

``save_tiny_reward_models(directory)`` writes ``qwen2_vl/`` (``Qwen2VLForConditionalGeneration``, width 32, 2 + 2
layers, patch 14) and ``clip/`` (``CLIPModel``, width 32, 28² input) with word-level tokenizers trained offline,
each folder as transformers' ``save_pretrained`` leaves it: exactly what a user points the configs at.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    CLIPConfig,
    CLIPModel,
    PreTrainedTokenizerFast,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)
from transformers.utils.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
"""Qwen2-VL's special tokens the video reward's prompt uses (``<|endoftext|>`` pads)."""

_WORDS = (
    "you are a helpful assistant system user the first image is input frame this video was generated from "
    "followed by rate on three criteria each visual quality motion text alignment please provide rating of "
    "a cat walks across garden in morning light camera pans over city at night bright dark scene"
)


def _word_tokenizer(special: tuple[str, ...], pad: str, unk: str) -> Tokenizer:
    tokenizer = Tokenizer(models.WordLevel(unk_token=unk))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator([_WORDS], trainers.WordLevelTrainer(special_tokens=[pad, unk, *special]))
    return tokenizer


def save_tiny_reward_models(directory: str | Path, seed: int = 0) -> dict[str, Path]:
    """Write tiny random ``qwen2_vl/`` and ``clip/`` folders under ``directory``; returns their paths."""
    directory = Path(directory)
    paths = {"qwen2_vl": directory / "qwen2_vl", "clip": directory / "clip"}
    qwen_tokens = _word_tokenizer(QWEN_SPECIAL_TOKENS[1:], "<|endoftext|>", "<unk>")
    qwen_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=qwen_tokens,
        pad_token="<|endoftext|>",
        unk_token="<unk>",
        additional_special_tokens=list(QWEN_SPECIAL_TOKENS[1:]),
    )
    ids = {token: qwen_tokenizer.convert_tokens_to_ids(token) for token in QWEN_SPECIAL_TOKENS}
    clip_tokens = _word_tokenizer(("<|startoftext|>",), "<|endoftext|>", "<unk>")
    clip_tokens.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>",
        special_tokens=[(t, clip_tokens.token_to_id(t)) for t in ("<|startoftext|>", "<|endoftext|>")],
    )
    clip_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=clip_tokens,
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token="<unk>",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        qwen = Qwen2VLForConditionalGeneration(
            Qwen2VLConfig(
                text_config={
                    "vocab_size": len(qwen_tokenizer),
                    "hidden_size": 32,
                    "intermediate_size": 64,
                    "num_hidden_layers": 2,
                    "num_attention_heads": 4,
                    "num_key_value_heads": 2,
                    "max_position_embeddings": 2048,
                    # head dim 8: M-RoPE splits its 4 frequencies over (time, height, width)
                    "rope_parameters": {
                        "rope_type": "default",
                        "rope_theta": 10000.0,
                        "mrope_section": [2, 1, 1],
                    },
                    "pad_token_id": ids["<|endoftext|>"],
                    "bos_token_id": ids["<|im_start|>"],
                    "eos_token_id": ids["<|im_end|>"],
                },
                vision_config={
                    "depth": 2,
                    "embed_dim": 32,
                    "hidden_size": 32,
                    "num_heads": 4,
                    "mlp_ratio": 2,
                    "patch_size": 14,
                    "spatial_merge_size": 2,
                    "temporal_patch_size": 2,
                },
                image_token_id=ids["<|image_pad|>"],
                video_token_id=ids["<|video_pad|>"],
                vision_start_token_id=ids["<|vision_start|>"],
                vision_end_token_id=ids["<|vision_end|>"],
            )
        )
        clip = CLIPModel(
            CLIPConfig(
                text_config={
                    "vocab_size": len(clip_tokenizer),
                    "hidden_size": 32,
                    "intermediate_size": 64,
                    "num_hidden_layers": 2,
                    "num_attention_heads": 4,
                    "max_position_embeddings": 77,
                    "pad_token_id": clip_tokenizer.pad_token_id,
                    "bos_token_id": clip_tokenizer.bos_token_id,
                    "eos_token_id": clip_tokenizer.eos_token_id,
                },
                vision_config={
                    "hidden_size": 32,
                    "intermediate_size": 64,
                    "num_hidden_layers": 2,
                    "num_attention_heads": 4,
                    "image_size": 28,
                    "patch_size": 14,
                },
                projection_dim=16,
            )
        )
    qwen.save_pretrained(paths["qwen2_vl"])
    qwen_tokenizer.save_pretrained(paths["qwen2_vl"])
    # the image statistics a Qwen2-VL processor folder carries
    preprocessor = {
        "image_mean": list(OPENAI_CLIP_MEAN),
        "image_std": list(OPENAI_CLIP_STD),
        "patch_size": 14,
    }
    (paths["qwen2_vl"] / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=1) + "\n")
    clip.save_pretrained(paths["clip"])
    clip_tokenizer.save_pretrained(paths["clip"])
    return paths
