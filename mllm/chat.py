"""``mllm chat CHECKPOINT``: talk to a trained model in the terminal.

Each line is a user turn, answered with tokens streamed as they are generated; the
conversation is kept (multi-turn) until ``/reset``. Media are attached to the next turn with
``/image PATH``, ``/video PATH``, ``/audio PATH``, ``/speech PATH`` (several per turn); they go
where the turn's text has placeholders (``<image>``...), else one placeholder line each before
the text, as in the training records. A turn that fails (a missing or unreadable file, too long
a history) prints ``error: ...`` and the session goes on. ``/quit`` or end of input ends it.
Prompts are rendered with the checkpoint's recorded template and system prompt.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from mllm.errors import UserError
from mllm.modality import MEDIA_FIELDS

HELP = ("commands: /image PATH, /video PATH, /audio PATH, /speech PATH (attach to the next turn), /reset (forget "
        "the conversation), /help, /quit; any other line is your message")


class ChatSession:
    """The conversation so far and the media waiting for the next turn; no terminal I/O."""

    def __init__(self, model, engine, sampling: dict, limits=None):
        from mllm.serve.inputs import Limits

        self.model = model
        self.engine = engine
        self.sampling = sampling
        self.limits = limits or Limits()
        self.reset()

    def reset(self) -> None:
        self.messages: list[dict] = []
        self.media: dict[str, list] = {}           # field -> preprocessed items of past turns
        self.pending: list[tuple[str, object]] = []   # (field, item) for the next turn

    def attach(self, field_name: str, path: str) -> None:
        from mllm.serve.inputs import decode_media_file

        self.pending.append((field_name, decode_media_file(self.model.processor, field_name, path, self.limits)))

    def ask(self, text: str, on_text=lambda piece: None, on_start=lambda: None) -> str:
        """Send one user turn; ``on_text`` gets each new piece of the answer. Raises UserError
        (and then leaves the conversation as it was) when the turn cannot be taken."""
        from mllm.serve.engine import SamplingParams
        from mllm.serve.inputs import build_prompt, placeholder_counts

        if self.pending and not placeholder_counts(text):
            text = "".join(MEDIA_FIELDS[f] + "\n" for f, _ in self.pending) + text
        media = {f: list(items) for f, items in self.media.items()}
        for field_name, item in self.pending:
            media.setdefault(field_name, []).append(item)
        messages = [*self.messages, {"role": "user", "content": text}]
        prompt = build_prompt(self.model, messages, media, self.limits, what="this turn")
        on_start()
        answer = asyncio.run(self._generate(prompt, SamplingParams(**self.sampling), on_text))
        self.messages = [*messages, {"role": "assistant", "content": answer}]
        self.media, self.pending = media, []
        return answer

    async def _generate(self, prompt, params, on_text) -> str:
        from mllm.serve.engine import GenerationRequest

        request = GenerationRequest(prompt, params, asyncio.get_running_loop())
        self.engine.submit(request)
        pieces = []
        try:
            while True:
                event = await request.events.get()
                if event.kind == "delta":
                    pieces.append(event.text)
                    on_text(event.text)
                elif event.kind == "error":
                    raise UserError(event.text)
                else:
                    return "".join(pieces)
        finally:
            request.cancel()   # a no-op once finished; stops generation on Ctrl-C


def chat_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mllm chat", description="Chat with a checkpoint in the terminal. " + HELP)
    parser.add_argument("checkpoint", help="stage-1/2 output folder, an `mllm export` folder, or a Hub id")
    parser.add_argument("--max-new-tokens", type=int, help="default: the checkpoint's prompt record")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--stop", action="append", default=[], help="stop at this text (repeatable)")
    parser.add_argument("--template", help="override the checkpoint's recorded chat template")
    parser.add_argument("--system-prompt", help="override the checkpoint's recorded system prompt")
    parser.add_argument("--device", help="default: cuda if available, else cpu")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    return parser


def chat_main(argv: list[str] | None = None, stdin=None, stdout=None) -> int:
    import logging

    from mllm.serve.engine import create_engine
    from mllm.serve.inputs import accepted_fields, load_model_for_inference

    args = chat_parser().parse_args(argv)
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    model = load_model_for_inference(args.checkpoint, args.device, args.template, args.system_prompt,
                                     args.max_new_tokens)
    engine = create_engine(model, max_batch_size=1, batch_window_s=0.0)
    sampling = {"max_tokens": model.prompt_record.max_new_tokens, "temperature": args.temperature,
                "top_p": args.top_p, "stop": args.stop}
    session = ChatSession(model, engine, sampling)
    fields = accepted_fields(model.processor)
    print(f"mllm chat: {args.checkpoint} (takes {', '.join(fields) or 'text only'}). {HELP}", file=stdout, flush=True)

    def show(piece: str) -> None:
        stdout.write(piece)
        stdout.flush()

    try:
        while True:
            stdout.write("User: ")
            stdout.flush()
            line = stdin.readline()
            if not line:
                break
            line = line.rstrip("\n")
            command, _, rest = line.strip().partition(" ")
            try:
                if command in ("/quit", "/exit"):
                    break
                if command == "/help":
                    print(HELP, file=stdout)
                elif command == "/reset":
                    session.reset()
                    print("(conversation cleared)", file=stdout)
                elif command.startswith("/") and command[1:] in MEDIA_FIELDS:
                    if not rest.strip():
                        raise UserError(f"{command} needs a file path")
                    session.attach(command[1:], rest.strip())
                    print(f"(attached {command[1:]} {rest.strip()} to the next message)", file=stdout)
                elif command.startswith("/"):
                    raise UserError(f"unknown command {command}; {HELP}")
                elif line.strip():
                    session.ask(line, show, on_start=lambda: show("Assistant: "))
                    stdout.write("\n")
            except UserError as e:
                print(f"error: {' '.join(str(e).split())}", file=stdout, flush=True)
    except KeyboardInterrupt:
        pass
    finally:
        engine.close()
    print("", file=stdout)
    return 0


__all__ = ["ChatSession", "chat_main", "chat_parser"]
