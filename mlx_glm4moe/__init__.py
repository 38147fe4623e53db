"""mlx-glm4moe: the GLM-4.5 family (glm4_moe) on Apple Silicon with MLX."""

from .chat import PromptCache, chat, stream_chat
from .generate import GenerationResponse, generate, stream_generate
from .loading import load
from .model import Model, ModelArgs

__all__ = [
    "GenerationResponse",
    "Model",
    "ModelArgs",
    "PromptCache",
    "chat",
    "generate",
    "load",
    "stream_chat",
    "stream_generate",
]
