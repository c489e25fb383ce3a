"""Video-GPT network: Phi-3-style backbone, Video-GPT embeddings and head."""

from vgpt_jax.model.presets import PRESETS, model_config
from vgpt_jax.model.video_gpt import VideoGPT

__all__ = ["PRESETS", "VideoGPT", "model_config"]
