"""The way to Triton: the gRPC backend, many replicas, lazy loading, and the limits each model
declares (its contract).
"""
