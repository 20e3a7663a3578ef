"""OpenAI-compatible chat API in front of the Triton-served Qwen2.5-VL model."""
