"""The Files API (`/v1/files`): uploads streamed to stored state (proxy/state/files.py)."""
