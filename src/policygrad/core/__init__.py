"""Pure tensor math shared by every policy: advantages, losses, the TRPO solver.

Nothing here imports gymnasium or transformers.
"""
