"""The web chat (nanochat_jax/web/app.py): `make_server(create_app(params=p, cfg=c, tokenizer=t), port=8000).run()`."""

from nanochat_jax.web.app import (BackgroundServer, ChatRequest, Generation, RequestError, SamplingDefaults, Worker,
                                  WorkerPool, create_app, get_pool, make_engines, make_server, parse_chat_request,
                                  parse_messages, render_prompt, warm_up)

__all__ = ["BackgroundServer", "ChatRequest", "Generation", "RequestError", "SamplingDefaults", "Worker",
           "WorkerPool", "create_app", "get_pool", "make_engines", "make_server", "parse_chat_request",
           "parse_messages", "render_prompt", "warm_up"]
