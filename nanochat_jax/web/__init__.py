"""The web chat: a Flask app (SSE + OpenAI-compatible API, a worker pool with one engine per device) and its page.

    from nanochat_jax.web import create_app, make_server
    make_server(create_app(params=params, cfg=cfg, tokenizer=tokenizer), port=8000).run()
"""

from nanochat_jax.web.app import (BackgroundServer, ChatRequest, Generation, RequestError, SamplingDefaults, Worker,
                                  WorkerPool, create_app, get_pool, make_engines, make_server, parse_chat_request,
                                  parse_messages, render_prompt, warm_up)

__all__ = ["BackgroundServer", "ChatRequest", "Generation", "RequestError", "SamplingDefaults", "Worker",
           "WorkerPool", "create_app", "get_pool", "make_engines", "make_server", "parse_chat_request",
           "parse_messages", "render_prompt", "warm_up"]
