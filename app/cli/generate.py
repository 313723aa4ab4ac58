"""`tuneserve generate`: text from a base model or an adapter, whole or streamed as it comes."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

import typer

from app.cli.client import ApiError, Client
from app.cli.common import JsonOption, UrlOption, call, fail, make_client, note, print_json


def _stream(client: Client, body: dict[str, Any], as_json: bool) -> None:
    """POST /generate with stream: each piece of text on stdout as it arrives (with --json,
    each event's JSON on a line of its own). Ctrl-C hangs up, which ends the generation."""
    try:
        with client.stream("POST", "/generate", json={**body, "stream": True}) as response:
            for line in response.iter_lines():
                if not line.startswith("data: "):
                    continue  # the blank line between events
                payload = line.removeprefix("data: ")
                if payload == "[DONE]":
                    break
                event = json.loads(payload)
                if as_json:
                    sys.stdout.write(payload + "\n")
                elif event.get("object") == "generation.chunk":
                    sys.stdout.write(event["text"])
                sys.stdout.flush()
                if "error" in event:  # the generation broke off after it started
                    sys.stdout.write("" if as_json else "\n")
                    fail(f"{event['error']['message']} [{event['error']['code']}]")
    except ApiError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        sys.stdout.write("\n")
        note("interrupted")
        raise typer.Exit(130) from None
    if not as_json:
        sys.stdout.write("\n")


def generate(
    prompt: str,
    adapter: Annotated[
        str | None, typer.Option(help="Job id, adapter id or name; none = base model.")
    ] = None,
    base_model: Annotated[
        str | None, typer.Option(help="Base model when no adapter (default model).")
    ] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Most tokens to generate.")] = 128,
    temperature: Annotated[float, typer.Option(min=0, help="0 = greedy.")] = 0.0,
    stop: Annotated[
        list[str] | None, typer.Option("--stop", help="Stop before this text; repeatable.")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the sampling.")] = None,
    raw: Annotated[
        bool, typer.Option("--raw", help="Continue PROMPT as raw text, no chat template.")
    ] = False,
    stream: Annotated[
        bool, typer.Option("--stream", help="Print the text as it is generated.")
    ] = False,
    url: UrlOption = None,
    as_json: JsonOption = False,
) -> None:
    """Generate with the base model or an adapter (PROMPT is sent as a user chat message)."""
    body: dict[str, Any] = {"max_new_tokens": max_new_tokens, "temperature": temperature}
    optional = {"adapter": adapter, "base_model": base_model, "stop": stop, "seed": seed}
    body.update({key: value for key, value in optional.items() if value not in (None, [])})
    if raw:
        body["prompt"] = prompt
    else:
        body["messages"] = [{"role": "user", "content": prompt}]
    client = make_client(url)
    if stream:
        _stream(client, body, as_json)
        return
    result = call(client, "POST", "/generate", json=body)
    if as_json:
        print_json(result)
    else:
        sys.stdout.write(result["text"] + "\n")
