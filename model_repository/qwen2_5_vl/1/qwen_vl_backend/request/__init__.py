"""A Triton request's raw inputs to a prepared request: chat messages and template, tools, sampling
parameters.
"""
