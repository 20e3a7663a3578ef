"""Request parsing, image handling and generation for the Qwen2.5-VL Triton model.

Nothing here imports triton_python_backend_utils, so all of it unit-tests on a CPU without
Triton; ``model.py`` next to this package is the thin Triton lifecycle around it.
"""
