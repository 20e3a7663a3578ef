"""OpenAI's legacy completions: `POST /v1/completions`."""
