"""Anthropic's Messages API (`POST /v1/messages`) on the shared request path."""
