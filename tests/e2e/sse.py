"""Reading an OpenAI SSE stream the way a plain-HTTP client does."""

import json


def read_events(response):
    """Parsed `data:` events of a streaming response, up to and including [DONE]."""
    events = []
    for line in response.iter_lines():
        if not line:
            continue
        assert line.startswith(b"data: "), line
        data = line[len(b"data: ") :]
        if data == b"[DONE]":
            events.append("[DONE]")
            break
        events.append(json.loads(data))
    return events
