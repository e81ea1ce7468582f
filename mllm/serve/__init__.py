"""Using a trained model: batched generation engine, OpenAI-compatible server, chat page.

``mllm.serve.app`` needs the ``serve`` extra (FastAPI, uvicorn); ``mllm.serve.inputs``,
``mllm.serve.engine`` and ``mllm.serve.engine_process`` (the engine in a child process, the
server's default) need only the core dependencies.
"""
