"""The model's weights and forward: loading the checkpoint, prepacked CPU linears, the vision tower
in stages.
"""
