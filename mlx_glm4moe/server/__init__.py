"""An OpenAI- and Anthropic-compatible server for GLM-4.5 models, on FastAPI + uvicorn.

One module per API over one request pipeline in `core`: `openai` (chat completions,
completions), `anthropic` (messages), `responses` (the Responses API) each give only their
request schema, its translation into a `core.Spec`, and an `core.Encoder` of the answer; `core`
parses, tokenizes, submits, streams or collects, and maps errors; `app` mounts them with auth,
error bodies, health and metrics.

Routes: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/responses``, ``/v1/models`` (OpenAI),
``/v1/messages``, ``/v1/messages/count_tokens`` (Anthropic), ``/health``, ``/metrics``
(Prometheus). Run it with ``python -m mlx_glm4moe.server --model PATH`` (or ``glm4moe-server``).
"""

from .app import create_app, main
from .embedded import Server

__all__ = ["Server", "create_app", "main"]
