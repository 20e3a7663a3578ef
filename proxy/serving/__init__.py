"""Serving policy around every route: admission (caps, timeouts, draining), the API key, graceful
shutdown.
"""
