"""One package per API surface the proxy serves (chat completions, responses, ...): each parses its
own request body, runs it through the shared request path (proxy/request/) and renders the
model's output in its own shapes.
"""
