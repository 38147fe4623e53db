"""mlx-glm4moe: the GLM-4.5 family (glm4_moe) and GLM-4.7-Flash (glm4_moe_lite) on Apple Silicon
with MLX."""

from .chat import PromptCache, chat, stream_chat
from .generate import GenerationResponse, generate, stream_generate
from .loading import load
from .models import Model

__all__ = [
    "GenerationResponse",
    "Model",
    "PromptCache",
    "Server",
    "chat",
    "generate",
    "load",
    "stream_chat",
    "stream_generate",
]


def __getattr__(name: str) -> object:
    # The server pulls in FastAPI and uvicorn: only for those who ask for it.
    if name == "Server":
        from .server import Server

        return Server
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
