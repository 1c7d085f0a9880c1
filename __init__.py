"""ComfyUI entry point of the VANS node pack.

ComfyUI imports this folder as a package (under a name derived from its path) and calls
``comfy_entrypoint``. Anywhere else (pytest collecting from the repository root, the trainer, the
CLI) importing this file does nothing: the node modules, and with them ComfyUI's own modules, are
imported only when ComfyUI asks for the node list.

Registration is V3 only. ``NODE_CLASS_MAPPINGS`` must never be defined here: ComfyUI's loader
registers V1 mappings *instead of* ``comfy_entrypoint`` when a module has both.
"""


async def comfy_entrypoint():
    """Called by ComfyUI (>= 0.3.64) once at start-up; returns the pack's ComfyExtension."""
    from .nodes import VansExtension

    return VansExtension()
