"""TEST ONLY. Lets ComfyUI's own loaders build the tiny random-weight Wan models of the tests.

ComfyUI infers a Wan DiT's size from the file, but hard-codes two sizes: the umT5-XXL text-encoder
config (``umt5_config_xxl.json``) and the Wan2.1 VAE base width (96). This pack replaces exactly those
two numbers with the tiny ones named in the JSON file at ``$VANS_TINY_ARCH`` (written by
``tests/comfyui/tiny_models.py``); every loading code path (detection, key conversion, the
tokenizer stored inside the umT5 file, dtype choice, model management) stays ComfyUI's own.
Without ``$VANS_TINY_ARCH`` it changes nothing.
"""

import json
import os

NODE_CLASS_MAPPINGS = {}  # registers no node; present so ComfyUI does not warn about the module


def apply(arch: dict) -> None:
    import comfy.ldm.wan.vae
    import comfy.text_encoders.wan

    umt5_config = arch.get("umt5_config")
    vae_dim = int(arch.get("wan_vae_dim") or 96)
    te_model = comfy.text_encoders.wan.UMT5XXlModel
    vae_model = comfy.ldm.wan.vae.WanVAE
    if getattr(te_model, "_vans_tiny", False):
        return
    te_init, vae_init = te_model.__init__, vae_model.__init__

    def tiny_te_init(self, *args, **kwargs):
        # the parent SDClipModel accepts a dict where the original passes the JSON file's path
        original = comfy.sd1_clip.SDClipModel.__init__

        def with_tiny_config(inner_self, *a, **kw):
            if umt5_config is not None:
                kw["textmodel_json_config"] = dict(umt5_config)
            original(inner_self, *a, **kw)

        comfy.sd1_clip.SDClipModel.__init__ = with_tiny_config
        try:
            te_init(self, *args, **kwargs)
        finally:
            comfy.sd1_clip.SDClipModel.__init__ = original

    def tiny_vae_init(self, *args, **kwargs):
        kwargs["dim"] = vae_dim
        vae_init(self, *args, **kwargs)

    import comfy.sd1_clip  # noqa: F401  (used inside tiny_te_init)

    te_model.__init__ = tiny_te_init
    vae_model.__init__ = tiny_vae_init
    te_model._vans_tiny = True


if os.environ.get("VANS_TINY_ARCH"):
    with open(os.environ["VANS_TINY_ARCH"], encoding="utf-8") as f:
        apply(json.load(f))
