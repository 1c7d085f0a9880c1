"""VANS engine: Video-Next-Event Prediction (caption reasoning + context-conditioned video).

This package imports nothing from ComfyUI. Heavy libraries (transformers, diffusers, open_clip)
are imported inside the modules that need them, so `import vans` stays cheap.

Frame layout used everywhere in the engine: a float32 tensor ``[T, H, W, C]`` with values in
0..1 and C = 3 (the layout of a ComfyUI ``IMAGE`` batch whose batch axis is time).
"""

__version__ = "0.1.0"
