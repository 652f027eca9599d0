"""The naive baseline: transformers behind HTTP, one request at a time, as a first attempt at
serving would be. It speaks TGI's `/generate_stream` (tokens as server-sent events, greedy,
`ignore_eos` honoured) and `/health`.

    python -m benchmark.naive_server --model-dir DIR --port 8091 [--dtype bfloat16]

Each token is one forward with the model's own KV cache (`past_key_values`); requests wait for
each other behind a lock, so this measures what batching and the rest buy.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator

import torch
import typer
from aiohttp import web


def generate_ids(
    model, tokenizer, prompt: str, max_new_tokens: int, ignore_eos: bool
) -> Iterator[int]:
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    past = None
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            out = model(input_ids=ids, past_key_values=past, use_cache=True)
            past = out.past_key_values
            token = int(out.logits[0, -1].argmax())
            yield token
            if token == tokenizer.eos_token_id and not ignore_eos:
                return
            ids = torch.tensor([[token]])


def make_app(model, tokenizer) -> web.Application:
    lock = asyncio.Lock()

    async def generate_stream(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        params = body.get("parameters") or {}
        max_new = int(params.get("max_new_tokens") or 20)
        ignore_eos = bool(params.get("ignore_eos"))
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        async with lock:  # one request at a time
            queue: asyncio.Queue = asyncio.Queue()
            loop = asyncio.get_running_loop()

            def work() -> None:
                for token in generate_ids(model, tokenizer, body["inputs"], max_new, ignore_eos):
                    loop.call_soon_threadsafe(queue.put_nowait, token)
                loop.call_soon_threadsafe(queue.put_nowait, None)

            threading.Thread(target=work, daemon=True).start()
            index = 0
            while (token := await queue.get()) is not None:
                index += 1
                text = tokenizer.decode([token])
                event = {"index": index, "token": {"id": token, "text": text}}
                await response.write(f"data: {json.dumps(event)}\n\n".encode())
        return response

    async def health(request: web.Request) -> web.Response:
        return web.Response(status=200)

    app = web.Application()
    app.router.add_post("/generate_stream", generate_stream)
    app.router.add_get("/health", health)
    return app


def main(
    model_dir: str = typer.Option(...),
    port: int = typer.Option(8091),
    dtype: str = typer.Option("bfloat16"),
) -> None:
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=getattr(torch, dtype)
    ).eval()
    web.run_app(make_app(model, tokenizer), host="127.0.0.1", port=port, print=None)


if __name__ == "__main__":
    typer.run(main)
