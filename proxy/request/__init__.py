"""The request path every API surface shares: the internal request (schema), its limits, the
translation to the Triton model's tensors, tools and structured output, usage and SSE framing.
"""
