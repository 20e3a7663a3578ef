"""vLLM's `POST /tokenize` and `POST /detokenize`, answered by the model."""
