"""Continuous batching: the scheduler, the slot KV cache and its attention, sampling, grammar
masks, detokenizing and the image-embedding cache.
"""
