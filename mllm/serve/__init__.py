"""Using a trained model: batched generation engine, OpenAI-compatible server, chat page.

``mllm.serve.app`` needs the ``serve`` extra (FastAPI, uvicorn); ``mllm.serve.inputs`` and
``mllm.serve.engine`` need only the core dependencies.
"""
