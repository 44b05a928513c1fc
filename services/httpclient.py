"""``pdserve generate --http URL``: the OpenAI-compatible door from the command line.

Standard library only (http.client + ssl), so the CLI needs no HTTP package: it POSTs a
streaming /v1/chat/completions (or /v1/completions with --raw), prints each SSE delta as
it arrives and ends with the usage and the client-side TTFT.
"""

from __future__ import annotations

import argparse
import http.client
import json
import ssl
import sys
import time
from typing import Any
from urllib.parse import urlsplit


def request_body(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """The path and JSON body matching the gRPC request the same flags would send."""
    body: dict[str, Any] = {"temperature": args.temperature, "stream": True,
                            "stream_options": {"include_usage": True}}
    if args.raw:
        path, body["prompt"] = "/v1/completions", args.prompt
    else:
        path = "/v1/chat/completions"
        body["messages"] = [{"role": "user", "content": args.prompt}]
    for key in ("max_tokens", "top_p", "seed", "stop", "scenario", "ttft_deadline_ms"):
        value = getattr(args, key)
        if value not in (None, "", 0, []):
            body[key] = value
    return path, body


def generate_http(args: argparse.Namespace) -> int:
    url = urlsplit(args.http.rstrip("/"))
    if url.scheme not in ("http", "https") or not url.hostname:
        print(f"error: --http wants http(s)://host:port, got {args.http!r}", file=sys.stderr)
        return 2
    path, body = request_body(args)
    conn: http.client.HTTPConnection
    if url.scheme == "https":
        ctx = ssl.create_default_context(cafile=args.tls_ca or None)
        conn = http.client.HTTPSConnection(url.hostname, url.port or 443, context=ctx,
                                           timeout=args.timeout)
    else:
        conn = http.client.HTTPConnection(url.hostname, url.port or 80, timeout=args.timeout)
    headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
    if args.api_key:
        headers["Authorization"] = f"Bearer {args.api_key}"
    t0 = time.monotonic()
    first_at = None
    usage: dict[str, int] = {}
    finish = ""
    try:
        conn.request("POST", url.path + path, body=json.dumps(body), headers=headers)
        resp = conn.getresponse()
        if resp.status != 200:
            err = json.loads(resp.read() or b"{}").get("error", {})
            print(f"error: HTTP {resp.status} [{err.get('code')}]: {err.get('message')}",
                  file=sys.stderr)
            return 1
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                break
            event = json.loads(data)
            if "error" in event:
                print(f"\nerror: [{event['error'].get('code')}]: {event['error'].get('message')}",
                      file=sys.stderr)
                return 1
            for choice in event.get("choices") or []:
                text = choice.get("text") if args.raw else \
                    (choice.get("delta") or {}).get("content")
                if text:
                    first_at = first_at or time.monotonic()
                    sys.stdout.write(text)
                    sys.stdout.flush()
                finish = choice.get("finish_reason") or finish
            usage = event.get("usage") or usage
    except (OSError, http.client.HTTPException) as e:
        print(f"\nerror: {e}", file=sys.stderr)
        return 1
    finally:
        conn.close()
    print(f"\n\n[{finish}] client ttft {1e3 * ((first_at or t0) - t0):.0f} ms | "
          f"prompt {usage.get('prompt_tokens', 0)} + completion "
          f"{usage.get('completion_tokens', 0)} tokens | e2e "
          f"{1e3 * (time.monotonic() - t0):.0f} ms", file=sys.stderr)
    return 0
