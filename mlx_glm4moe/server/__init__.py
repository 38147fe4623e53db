"""An OpenAI- and Anthropic-compatible server for GLM-4.5 models, on FastAPI + uvicorn.

One module per API over one shared core: `openai` (chat completions, completions), `anthropic`
(messages), each a thin translation between its wire format and `core` (request → job →
generation → parsed events); `app` mounts them with auth, errors and metrics.

Routes: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models`` (OpenAI),
``/v1/messages``, ``/v1/messages/count_tokens`` (Anthropic), ``/health``, ``/metrics``
(Prometheus). Run it with ``python -m mlx_glm4moe.server --model PATH`` (or ``glm4moe-server``).
"""

from .app import create_app, main
from .embedded import Server

__all__ = ["Server", "create_app", "main"]
