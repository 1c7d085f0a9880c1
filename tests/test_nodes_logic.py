"""What the nodes compute themselves (everything else is the engine's and tested there), without ComfyUI.

The key check: the context wrapper that the ContextConditioning node installs on ComfyUI's
``apply_model`` (input x_t, output the CONST model's denoised x0 = x − σ·v) is the engine's
``VideoGenerator.model_velocity`` once x0 is turned back into a velocity. A toy DiT that mixes
information across time makes any error in where or how the context is prepended visible.
"""

from __future__ import annotations

import importlib
import math
import re

import pytest
import torch

from nodes_stub import stubbed_pack

PACK = "vans_pack_logic"


@pytest.fixture(scope="module")
def pack():
    with stubbed_pack(PACK):
        modules = {name: importlib.import_module(f"{PACK}.nodes.{name}")
                   for name in ("batching", "frames", "conditioning", "selection")}
        modules["InputError"] = importlib.import_module(f"{PACK}.vans.errors").InputError
        yield modules


# -- the context wrapper == the engine model call ------------------------------------------------
class ToyDiT(torch.nn.Module):
    """Velocity that depends on every frame (causal mean over time), the timestep and the text."""

    def __init__(self):
        super().__init__()
        self.mix = torch.nn.Parameter(torch.linspace(-1, 1, 16).view(1, 16, 1, 1, 1))

    def forward(self, hidden_states, timestep, encoder_hidden_states, return_dict=False):
        steps = torch.arange(1, hidden_states.shape[2] + 1, dtype=hidden_states.dtype).view(1, 1, -1, 1, 1)
        causal_mean = hidden_states.cumsum(dim=2) / steps
        t = (timestep / 1000).view(-1, 1, 1, 1, 1)
        text = encoder_hidden_states.mean(dim=(1, 2)).view(-1, 1, 1, 1, 1)
        return (torch.tanh(causal_mean * self.mix) * (1 + t) + text,)


def comfy_const_apply_model(dit):
    """ComfyUI's BaseModel._apply_model for a CONST (flow) model, reduced to the arithmetic."""

    def apply_model(x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        v = dit(hidden_states=x, timestep=t * 1000, encoder_hidden_states=c_crossattn)[0]
        return x - v * t.view(-1, 1, 1, 1, 1)

    return apply_model


@pytest.mark.parametrize("sigma", [1.0, 0.73, 0.05])
def test_context_wrapper_equals_the_engine_model_velocity(pack, sigma):
    from vans.generator import VideoGenerator

    torch.manual_seed(0)
    dit = ToyDiT()
    context = torch.randn(1, 16, 6, 4, 6)
    x = torch.randn(2, 16, 9, 4, 6)  # cond and uncond rows, as ComfyUI batches them
    text = torch.randn(2, 5, 8)
    engine = VideoGenerator(dit, None, None).model_velocity(x, torch.tensor(sigma), context, text)

    wrapper = pack["conditioning"].ContextPrepender(context)
    t = torch.full((2,), sigma)
    x0 = wrapper(comfy_const_apply_model(dit), x, t, None, text, None, {})
    comfy_velocity = (x - x0) / sigma
    assert x0.shape == x.shape
    torch.testing.assert_close(comfy_velocity, engine, rtol=1e-5, atol=1e-5)


def comfy_apply_model_in(dit, dtype):
    """ComfyUI's BaseModel._apply_model for a CONST model run in ``dtype``: the input and the text cast to
    the compute dtype, the timestep 1000·σ in fp32, the output back in fp32, x0 = x − σ·v."""

    def apply_model(x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        v = dit(hidden_states=x.to(dtype), timestep=(t * 1000).float(), encoder_hidden_states=c_crossattn.to(dtype))[0]
        return x - v.float() * t.view(-1, 1, 1, 1, 1)

    return apply_model


@pytest.mark.parametrize("sigma", [0.9973, 0.73, 0.3337])  # timesteps 997.3, 730, 333.7 -> bf16 996, 728, 334
def test_context_wrapper_rounds_the_timestep_as_the_engine_in_bf16(pack, sigma):
    """A bf16 model: the engine (default timestep_dtype="model", the official rule) calls the DiT with the
    timestep rounded to bf16; the wrapper makes ComfyUI's call see the same timestep, and re-expresses x0
    with the sampler's own σ, so the velocity KSampler derives is the engine's."""
    from vans.generator import VideoGenerator

    torch.manual_seed(0)
    dit = ToyDiT()
    context = torch.randn(1, 16, 6, 4, 6)
    x = torch.randn(2, 16, 9, 4, 6)
    text = torch.randn(2, 5, 8).bfloat16()
    gen = VideoGenerator(dit, None, None, dtype=torch.bfloat16)
    engine = gen.model_velocity(x, torch.tensor(sigma), context, text)
    exact = gen.model_velocity(x, torch.tensor(sigma), context, text, timestep_dtype="fp32")

    wrapper = pack["conditioning"].ContextPrepender(context, torch.bfloat16)
    t = torch.full((2,), sigma)
    x0 = wrapper(comfy_apply_model_in(dit, torch.bfloat16), x, t, None, text, None, {})
    comfy_velocity = (x - x0) / sigma
    torch.testing.assert_close(comfy_velocity, engine, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(comfy_velocity, exact, rtol=1e-4, atol=1e-4)  # the rounding is visible here
    # an fp32 model: nothing is rounded and the call is passed through unchanged
    fp32 = pack["conditioning"].ContextPrepender(context, torch.float32)
    seen = {}

    def executor(full, t_model, *args, **kwargs):
        seen["t"] = t_model
        return full

    fp32(executor, x, t)
    assert seen["t"] is t


def test_context_wrapper_puts_the_context_first_in_time(pack):
    seen = {}

    def executor(x, t, *args, **kwargs):
        seen["x"] = x
        return x * 2

    context = torch.full((1, 16, 2, 3, 3), 7.0)
    x = torch.zeros(3, 16, 4, 3, 3)
    out = pack["conditioning"].ContextPrepender(context)(executor, x, torch.ones(3))
    assert seen["x"].shape == (3, 16, 6, 3, 3)
    assert torch.all(seen["x"][:, :, :2] == 7) and torch.all(seen["x"][:, :, 2:] == 0)
    assert out.shape == x.shape and torch.all(out == 0)


def test_context_wrapper_refuses_a_latent_of_another_size(pack):
    InputError = pack["InputError"]
    wrapper = pack["conditioning"].ContextPrepender(torch.zeros(1, 16, 6, 4, 4))
    with pytest.raises(InputError, match="same VANS Context Conditioning node"):
        wrapper(lambda x, *a, **k: x, torch.zeros(1, 16, 9, 8, 8), torch.ones(1))


class ComfyLikeWanVAE:
    """ComfyUI's ``VAE.encode`` for Wan2.1 reduced to what it computes: IMAGE pixels ``[T, H, W, C]`` in 0..1
    -> the raw posterior mean ``[1, 16, t, h, w]`` in fp32 (here from the engine's diffusers model)."""

    def __init__(self, model):
        self.model = model
        self.calls = []

    def encode(self, pixels):
        self.calls.append(tuple(pixels.shape))
        x = pixels.movedim(-1, 0).unsqueeze(0) * 2 - 1
        with torch.no_grad():
            return self.model.encode(x).latent_dist.mean.float()


class ComfyLikeWan21:
    """``model.model.process_latent_in`` of ComfyUI's Wan21 latent format: (z − mean) · scale / std, scale 1."""

    def __init__(self, mean, std):
        self.model = self
        self.mean, self.std = mean, std

    def process_latent_in(self, latent):
        return (latent - self.mean.to(latent)) / self.std.to(latent)


def test_node_encodes_the_context_in_the_official_tiles_as_the_engine(pack, tmp_path):
    """The node's context at 640×352 (ComfyUI's VAE called on each official tile, normalised per tile,
    blended) is the engine's encode_context on the same VAE weights. Old code: the node encoded in one
    piece while the engine used diffusers' own tiles, and the two differed along the seams."""
    from vans.fixtures.wan import write_tiny_wan_vae
    from vans.generator import VideoGenerator
    from vans.wan.vae import load_vae

    vae = load_vae(write_tiny_wan_vae(tmp_path / "vae.safetensors"), dtype=torch.float32)
    clip = torch.rand(1, 352, 640, 3, generator=torch.Generator().manual_seed(3))
    engine = VideoGenerator(None, None, vae).encode_context(clip, 1)
    comfy_vae = ComfyLikeWanVAE(vae.model)
    node = pack["conditioning"].encode_context(ComfyLikeWan21(vae.latents_mean, vae.latents_std), comfy_vae, clip, 1)
    assert sorted(set(comfy_vae.calls)) == [(1, 232, 224, 3), (1, 232, 416, 3), (1, 240, 224, 3), (1, 240, 416, 3)]
    assert len(comfy_vae.calls) == 6  # 2 × 3 tiles
    assert node.shape == engine.shape == (1, 16, 1, 44, 80)
    torch.testing.assert_close(node, engine, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("width,height,length,num_context,problem", [
    (640, 352, 33, 6, None),
    (650, 352, 33, 6, "width=650"),
    (640, 8, 33, 6, "height=8"),
    (640, 352, 34, 6, "use 33 or 37"),
    (640, 352, 33, 10, "num_context=10: a 33-frame clip has 9 latent frames; lower num_context to 9 or raise length to 37"),
    (640, 352, 17, 6, "num_context=6: a 17-frame clip has 5 latent frames; lower num_context to 5 or raise length to 21"),
    (None, None, None, None, None),  # unset values are skipped
])
def test_video_settings_are_checked_with_a_fix(pack, width, height, length, num_context, problem):
    message = pack["conditioning"].check_video_settings(width, height, length, num_context)
    if problem is None:
        assert message is None
    else:
        assert problem in message


def test_context_node_refuses_bad_settings_when_it_runs_not_at_validation(pack):
    """ComfyUI drops the outputs of a node that fails validation and runs the rest to "success"; the node
    accepts at validation and stops the prompt when it runs, with one message naming the input."""
    node = pack["conditioning"].VANSContextConditioning
    assert node.validate_inputs(width=640, height=352, length=17, num_context=6) is True
    settings = dict(model=None, vae=None, frames=torch.zeros(20, 8, 8, 3), width=640, height=352, batch_size=1)
    with pytest.raises(pack["InputError"], match=r"^num_context=6: a 17-frame clip has 5 latent frames"):
        node.execute(length=17, num_context=6, **settings)
    with pytest.raises(pack["InputError"], match=r"^length=32: Wan needs 4n\+1 frames"):
        node.execute(length=32, num_context=6, **settings)
    with pytest.raises(pack["InputError"], match=r"^length=3: must be between 5 and 16384"):
        node.execute(length=3, num_context=1, **settings)


# -- candidates and scores ----------------------------------------------------------------------
def test_split_videos_from_one_batch_or_a_list(pack):
    split = pack["batching"].split_videos
    batch = torch.arange(12.0).view(12, 1, 1, 1).expand(12, 2, 2, 3)
    parts = split(batch, 3)
    assert [p[0, 0, 0, 0].item() for p in parts] == [0, 4, 8]
    listed = [torch.zeros(5, 2, 2, 3), torch.ones(7, 2, 2, 3)]
    assert split(listed, 2) is not listed and split(listed, 2)[1].shape[0] == 7


@pytest.mark.parametrize("videos,count,match", [
    (torch.zeros(10, 2, 2, 3), 3, "cannot be split into 3"),
    ([torch.zeros(2, 2, 2, 3)] * 2, 3, "2 videos but 3 scores"),
    (torch.zeros(3, 2, 2, 3), 0, "at least one"),
])
def test_split_videos_names_the_mismatch(pack, videos, count, match):
    InputError = pack["InputError"]
    with pytest.raises(InputError, match=match):
        pack["batching"].split_videos(videos, count)


def test_best_index_ignores_nan_and_keeps_the_first_of_ties(pack):
    best = pack["batching"].best_index
    assert best([0.1, 0.5, 0.5, -1.0]) == 1
    assert best([math.nan, 0.2, math.nan]) == 1
    InputError = pack["InputError"]
    with pytest.raises(InputError, match="NaN"):
        best([math.nan, math.nan])


def test_best_of_n_node_passes_on_the_best_video(pack):
    node = pack["selection"].VANSBestOfN
    batch = torch.cat([torch.full((3, 2, 2, 3), float(i)) for i in range(4)])
    out = node.execute(videos=[batch], rewards=[0.2, 0.9, math.nan, 0.4])
    video, index, reward = out.args
    assert index == 1 and reward == 0.9 and video.shape == (3, 2, 2, 3) and torch.all(video == 1)
    assert "best: #1 of 4" in out.ui.value


def test_scores_text_lists_each_candidate(pack):
    fmt = pack["batching"].format_scores
    assert fmt("CLIP-T", [0.25]) == "CLIP-T: 0.2500"
    assert fmt("r2", [1, -1]).splitlines() == ["r2 #0: 1.0000", "r2 #1: -1.0000"]


# -- frames for the VLM -------------------------------------------------------------------------
@pytest.mark.parametrize("total,fps,num_frames,sample_fps,expected", [
    (100, 25.0, 6, 0.0, 6),  # the VANS rule: a fixed count
    (100, 25.0, 16, 1.0, 4),  # 4 s at 1 fps
    (100, 25.0, 6, 2.0, 6),  # 8 would exceed the cap
    (30, 30.0, 6, 1.0, 2),  # 1 s: at least one pair
    (100, 25.0, 16, 1.5, 6),  # 6 frames (4 s × 1.5), kept even
])
def test_vlm_frame_count(pack, total, fps, num_frames, sample_fps, expected):
    assert pack["frames"].vlm_frame_count(total, fps, num_frames, sample_fps) == expected


def test_vlm_frame_count_needs_an_even_count_and_a_rate(pack):
    InputError = pack["InputError"]
    count = pack["frames"].vlm_frame_count
    with pytest.raises(InputError, match="even"):
        count(10, 25.0, 5, 0.0)
    with pytest.raises(InputError, match="fps=0"):
        count(10, 0.0, 6, 1.0)


def test_vlm_frames_follow_the_engine_spread_rule(pack):
    from vans.captioner import frame_indices

    frames = torch.arange(50.0).view(50, 1, 1, 1).expand(50, 2, 2, 3)
    picked = pack["frames"].pick_vlm_frames(frames, 25.0, None, 6, 0.0)
    assert picked[:, 0, 0, 0].long().tolist() == frame_indices(50, 6)
    short = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 2, 2, 3)  # fewer frames than asked: repeats
    assert pack["frames"].pick_vlm_frames(short, 25.0, None, 6, 0.0)[:, 0, 0, 0].long().tolist() == frame_indices(4, 6)


def test_vlm_frames_need_exactly_one_source(pack):
    InputError = pack["InputError"]
    pick = pack["frames"].pick_vlm_frames
    with pytest.raises(InputError, match="connect either"):
        pick(None, 25.0, None, 6, 0.0)
    with pytest.raises(InputError, match="only one"):
        pick(torch.zeros(4, 2, 2, 3), 25.0, object(), 6, 0.0)


class _Components:
    def __init__(self, images, frame_rate):
        self.images, self.frame_rate = images, frame_rate


class _MemoryVideo:
    """A VIDEO without a file behind it (e.g. made by Create Video)."""

    def __init__(self, images, rate):
        self._components = _Components(images, rate)

    def get_stream_source(self):
        import io

        return io.BytesIO(b"")

    def get_components(self):
        return self._components


class _BrokenVideo:
    def get_components(self):
        raise OSError("[Errno 1094995529] Invalid data found when processing input")


def test_video_without_a_file_uses_its_components(pack):
    from fractions import Fraction

    images = torch.arange(40.0).view(40, 1, 1, 1).expand(40, 2, 2, 3)
    picked = pack["frames"].pick_vlm_frames(None, 0.0, _MemoryVideo(images, Fraction(10)), 8, 1.0)
    assert picked.shape[0] == 4  # 4 s at 1 fps


def test_undecodable_video_is_an_input_error(pack):
    InputError = pack["InputError"]
    with pytest.raises(InputError, match="could not be decoded"):
        pack["frames"].pick_vlm_frames(None, 0.0, _BrokenVideo(), 6, 0.0)


class _FileVideo:
    """A VIDEO backed by a file, like core Load Video's."""

    def __init__(self, path):
        self.path = str(path)

    def get_stream_source(self):
        return self.path

    def get_components(self):
        raise AssertionError("a file-backed VIDEO must be read through the engine (bounded memory)")


def test_file_video_decodes_only_the_frames_the_vlm_sees(pack, tmp_path):
    from vans.video import read_video, synthetic_frames, write_video

    path = write_video(tmp_path / "clip.mp4", synthetic_frames(30, 48, 64), 10.0) or tmp_path / "clip.mp4"
    picked = pack["frames"].pick_vlm_frames(None, 0.0, _FileVideo(path), 6, 0.0, [tmp_path])
    expected = read_video(path, num_frames=6).frames
    assert picked.shape == (6, 48, 64, 3)
    torch.testing.assert_close(picked, expected)
    by_rate = pack["frames"].pick_vlm_frames(None, 0.0, _FileVideo(path), 16, 2.0, [tmp_path])
    assert by_rate.shape[0] == 6  # 3 s at 2 fps


def test_corrupt_file_video_is_an_input_error_naming_the_file(pack, tmp_path):
    path = tmp_path / "broken.mp4"
    path.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    with pytest.raises(pack["InputError"], match="broken.mp4"):
        pack["frames"].pick_vlm_frames(None, 0.0, _FileVideo(path), 6, 0.0, [tmp_path])


def test_video_file_outside_the_allowed_folders_is_refused_before_it_is_opened(pack, tmp_path):
    inputs, outside = tmp_path / "input", tmp_path / "elsewhere"
    inputs.mkdir(), outside.mkdir()
    (outside / "secret.mp4").write_bytes(b"not read")
    refused = pack["frames"].pick_vlm_frames
    (inputs / "link.mp4").symlink_to(outside / "secret.mp4")
    for path in (outside / "secret.mp4", inputs / ".." / "elsewhere" / "secret.mp4", "/etc/passwd",
                 str(inputs) + "_sibling/clip.mp4", inputs / "link.mp4"):
        with pytest.raises(pack["InputError"], match=r"^video: the file .* lies outside ComfyUI's input, output and temp"):
            refused(None, 0.0, _FileVideo(path), 6, 0.0, [inputs])
    with pytest.raises(pack["InputError"], match="outside"):  # no folder allowed: no file is read
        refused(None, 0.0, _FileVideo(inputs / "clip.mp4"), 6, 0.0)
    pack["frames"].check_video_file(inputs / "sub" / ".." / "clip.mp4", [tmp_path / "output", inputs])  # inside


def test_context_clip_uses_the_engine_picking_and_resize(pack):
    """The node picks the VDM's frames with the engine's FramePick rule (default: the first frames at 11 fps)."""
    from vans.video import FramePick, pick_indices, resize_frames, sample_indices

    frames = torch.rand(50, 40, 90, 3, generator=torch.Generator().manual_seed(1))
    context_clip = pack["conditioning"].context_clip
    clip = context_clip(frames, 33, 48, 64, fps=22.0)
    expected = resize_frames(frames[[2 * k for k in range(25)] + [48] * 8], (48, 64), resize="crop")
    assert pick_indices(50, 22.0, 33, FramePick()) == [2 * k for k in range(25)] + [48] * 8
    assert clip.shape == (33, 48, 64, 3)
    torch.testing.assert_close(clip, expected)
    torch.testing.assert_close(context_clip(frames, 33, 48, 64, "spread"),
                               resize_frames(frames[sample_indices(50, 33)], (48, 64), resize="crop"))
    torch.testing.assert_close(context_clip(frames, 5, 48, 64, "first"),
                               resize_frames(frames[:5], (48, 64), resize="crop"))
    with pytest.raises(pack["InputError"], match="connect Get Video Components' fps output to fps"):
        context_clip(frames, 33, 48, 64)


# -- input checks: every input of every node, one message naming it -----------------------------
NODE_MODULES = ("vlm", "conditioning", "rewards", "clip", "selection")
CHECKS = "vans_pack_checks"


@pytest.fixture(scope="module")
def checked(tmp_path_factory):
    """The pack with one VLM folder, one VLM checkpoint and one CLIP file in its model folders."""
    root = tmp_path_factory.mktemp("model_folders")
    (root / "LLM" / "Qwen-test").mkdir(parents=True)
    (root / "LLM" / "Qwen-test" / "config.json").write_text("{}")
    (root / "LLM" / "vlm.safetensors").write_bytes(b"")
    (root / "reward_models").mkdir()
    (root / "reward_models" / "clip.safetensors").write_bytes(b"")
    with stubbed_pack(CHECKS, roots={"LLM": [str(root / "LLM")], "reward_models": [str(root / "reward_models")]}):
        modules = {name: importlib.import_module(f"{CHECKS}.nodes.{name}") for name in NODE_MODULES}
        modules["InputError"] = importlib.import_module(f"{CHECKS}.vans.errors").InputError
        modules["classes"] = [cls for name in NODE_MODULES for cls in modules[name].NODES]
        yield modules


def widget_defaults(cls) -> dict:
    """Execute arguments with every widget at its default (a combo without one at its first option) and
    every socket unset, as lists for a node that takes whole lists."""
    schema = cls.define_schema()
    values = {}
    for spec in schema.inputs:
        value = spec.options.get("default")
        if value is None and spec.io_type == "COMBO":
            value = spec.options["options"][0]
        values[spec.id] = [value] if schema.is_input_list else value
    return values


HOSTILE = {
    "INT": ["abc", 2.5, True, {"a": 1}],
    "FLOAT": ["abc", {"a": 1}, True],
    "STRING": [{"a": 1}, 7, ["x"]],
    "BOOLEAN": ["yes", 1],
    "COMBO": ["../../../../etc/passwd", 3, "not-a-choice"],
}


def hostile_cases(classes):
    for cls in classes:
        schema = cls.define_schema()
        for spec in schema.inputs:
            opts = spec.options
            bad = list(HOSTILE.get(spec.io_type, []))
            if spec.io_type == "FLOAT" and not opts.get("force_input"):
                bad += [math.nan, math.inf]
            if opts.get("max") is not None:
                bad.append(opts["max"] + 1)
            if opts.get("min") is not None:
                bad.append(opts["min"] - 1)
            for value in bad:
                yield cls, spec.id, value


def test_every_node_takes_every_input_at_validation_and_accepts(checked):
    """ComfyUI checks min/max (and, in newer releases, combo options) only for inputs a node's
    validate_inputs does not take, and drops the outputs of a node that fails validation; each node
    takes them all (**values) and accepts, leaving the checks to its execute."""
    import inspect

    for cls in checked["classes"]:
        assert "validate_inputs" not in vars(cls), cls.__name__  # one rule for all nodes: VansNode's
        spec = inspect.getfullargspec(cls.validate_inputs)
        assert spec.varkw is not None and spec.args == ["cls"], cls.__name__
        assert cls.validate_inputs(length=17, num_context=6, dtype="bf17", question={"a": 1}) is True


def test_every_widget_input_refuses_a_hostile_value_naming_that_input(checked):
    cases = list(hostile_cases(checked["classes"]))
    assert len(cases) > 150  # every widget of every node
    for cls, name, value in cases:
        values = widget_defaults(cls)
        values[name] = [value] if cls.define_schema().is_input_list else value
        with pytest.raises(checked["InputError"]) as caught:
            cls.execute(**values)
        message = str(caught.value)
        assert message.startswith((f"{name}:", f"{name}=")), (cls.__name__, name, value, message)
        assert "\n" not in message


def test_linked_nan_scores_pass_the_type_check(checked):
    """A NaN from a reward node is a value (Best of N skips it); a widget value must be finite."""
    check = checked["vlm"].check_inputs
    best = checked["selection"].VANSBestOfN
    check(best, {"videos": [torch.zeros(2, 1, 1, 3)], "rewards": [math.nan, 0.5]})
    with pytest.raises(checked["InputError"], match=r"^rewards: expected a number, got 'x'"):
        check(best, {"rewards": [0.1, "x"]})


@pytest.mark.parametrize("overrides,message", [
    ({"num_frames": "abc"}, "num_frames: expected a whole number, got 'abc'"),
    ({"num_frames": 7}, "num_frames=7: use an even number"),
    ({"min_pixels": 800 * 784, "max_pixels": 600 * 784}, "min_pixels=627200 is above max_pixels=470400"),
    ({"question": {"a": 1}}, "question: expected text, got dict {'a': 1}"),
    ({"temperature": math.nan}, "temperature: expected a finite number, got float nan"),
    ({"decoding": "beam"}, "decoding: 'beam' is not one of the choices (official, policy)"),
])
def test_caption_settings_name_the_input_that_is_wrong(checked, overrides, message):
    node = checked["vlm"].VANSNextEventCaption
    values = widget_defaults(node) | overrides
    with pytest.raises(checked["InputError"]) as caught:
        node.execute(**values)
    assert str(caught.value).startswith(message), str(caught.value)


def test_model_choices_are_the_files_present_and_refuse_paths(checked):
    loader = checked["vlm"].VANSLoadVLM
    for name, value in (("model", "../../../etc"), ("checkpoint", "../vlm.safetensors"), ("dtype", "bf17"),
                        ("attention", "flash")):
        values = dict(model="Qwen-test", checkpoint="vlm.safetensors", dtype="auto", attention="sdpa") | {name: value}
        with pytest.raises(checked["InputError"], match=rf"^{name}: '{re.escape(value)}' is not one of the choices"):
            loader.execute(**values)
    with pytest.raises(checked["InputError"], match=r"^clip_name: '\.\./clip\.safetensors' is not one of the choices \(clip"):
        checked["clip"].VANSLoadCLIP.execute(clip_name="../clip.safetensors", allow_pickle=False)
