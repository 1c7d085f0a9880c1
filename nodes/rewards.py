"""Text rewards and the Joint-GRPO stage rewards as nodes (the engine's ``vans.rewards``).

Scores are FLOATs, usable for gating and selection, and are shown on the node. A node fed a list
(e.g. several captions) runs once per item and outputs a list; the stage rewards take the whole
group at once, since they normalise within it.
"""

from __future__ import annotations

from comfy_api.latest import io

from ..vans.errors import InputError
from .batching import format_scores
from .display import HIDDEN, output_with_text
from .host import VansNode, check_inputs

CATEGORY = "VANS/rewards"


def _text_input(name: str, tooltip: str):
    return io.String.Input(name, multiline=True, default="", tooltip=tooltip)


class VANSFormatReward(VansNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="VANSFormatReward",
            hidden=HIDDEN,
            is_output_node=True,  # shows its result even when nothing is connected after it
            display_name="VANS Format Reward",
            category=CATEGORY,
            description="1 when the whole response is exactly [Think]…[/Think][Ans]…[/Ans] with both blocks non-empty, else 0.",
            inputs=[_text_input("raw", "The VLM's whole response (the raw output of VANS Next-Event Caption)")],
            outputs=[io.Float.Output(display_name="format", tooltip="1.0 or 0.0")],
        )

    @classmethod
    def execute(cls, raw) -> io.NodeOutput:
        check_inputs(cls, locals())
        from ..vans.rewards import format_reward

        score = float(format_reward(raw))
        return output_with_text(cls, format_scores("format", [score]), score)


class VANSRougeL(VansNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="VANSRougeL",
            hidden=HIDDEN,
            is_output_node=True,  # shows its result even when nothing is connected after it
            display_name="VANS ROUGE-L",
            category=CATEGORY,
            description="ROUGE-L F-measure between a caption and the ground-truth caption (the stage-1 semantic reward).",
            inputs=[
                _text_input("prediction", "The caption to score, e.g. the caption output of VANS Next-Event Caption"),
                _text_input("reference", "The ground-truth description of the next event"),
            ],
            outputs=[io.Float.Output(display_name="rouge_l", tooltip="0..1, higher is closer")],
        )

    @classmethod
    def execute(cls, prediction, reference) -> io.NodeOutput:
        check_inputs(cls, locals())
        from ..vans.rewards import rouge_l

        score = float(rouge_l(prediction, reference))
        return output_with_text(cls, format_scores("ROUGE-L", [score]), score)


class VANSBleu(VansNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="VANSBleu",
            hidden=HIDDEN,
            is_output_node=True,  # shows its result even when nothing is connected after it
            display_name="VANS BLEU",
            category=CATEGORY,
            description="Sentence BLEU@1..4 (cumulative) between a caption and the ground-truth caption.",
            inputs=[
                _text_input("prediction", "The caption to score, e.g. the caption output of VANS Next-Event Caption"),
                _text_input("reference", "The ground-truth description of the next event"),
            ],
            outputs=[io.Float.Output(display_name=f"bleu_{n}", tooltip=f"Cumulative BLEU@{n}, 0..1")
                     for n in (1, 2, 3, 4)],
        )

    @classmethod
    def execute(cls, prediction, reference) -> io.NodeOutput:
        check_inputs(cls, locals())
        from ..vans.rewards import bleu

        scores = [float(s) for s in bleu(prediction, reference, max_n=4)]
        text = "\n".join(f"BLEU@{n}: {s:.4f}" for n, s in enumerate(scores, start=1))
        return output_with_text(cls, text, *scores)


def _one(values, name: str):
    """A widget value arrives as a one-item list in an input-list node."""
    if len(values) != 1:
        raise InputError(f"{name}: expected one value, got {len(values)}")
    return values[0]


def _per_item(values: list, count: int, name: str) -> list:
    """One value per group member: a list of ``count``, or one value shared by all."""
    if len(values) == count:
        return list(values)
    if len(values) == 1:
        return list(values) * count
    raise InputError(f"{name}: got {len(values)} values for a group of {count}; give one per caption or one for all")


class VANSStage1Reward(VansNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="VANSStage1Reward",
            hidden=HIDDEN,
            is_output_node=True,  # shows its result even when nothing is connected after it
            display_name="VANS Stage-1 Reward",
            category=CATEGORY,
            description=(
                "Joint-GRPO stage-1 reward of a group of responses to one question: the sum of the group-normalised "
                "format, ROUGE-L and CLIP-V rewards (r1 of the paper)."
            ),
            is_input_list=True,
            inputs=[
                io.String.Input("raw", force_input=True, tooltip=(
                    "The group's whole responses (raw output of VANS Next-Event Caption with answers = G)")),
                _text_input("reference", "The ground-truth description of the next event"),
                io.Float.Input("clip_v", force_input=True, tooltip=(
                    "CLIP-V of each response's generated video against the ground-truth video, same order as raw")),
            ],
            outputs=[
                io.Float.Output(display_name="reward", is_output_list=True, tooltip="r1 per response"),
                io.Float.Output(display_name="format", is_output_list=True, tooltip="Format reward per response"),
                io.Float.Output(display_name="rouge_l", is_output_list=True, tooltip="ROUGE-L per response"),
            ],
        )

    @classmethod
    def execute(cls, raw, reference, clip_v) -> io.NodeOutput:
        check_inputs(cls, locals())
        from ..vans.rewards import stage1_reward

        group = len(raw)
        references = _per_item(reference, group, "reference")
        scores = [float(s) for s in _per_item(clip_v, group, "clip_v")]
        result = stage1_reward(list(raw), references, scores, group_size=group)
        reward, fmt, rouge = (_floats(result[k]) for k in ("reward", "format", "rouge_l"))
        text = "\n".join(f"#{i}: r1 {r:.4f} (format {f:.0f}, ROUGE-L {g:.4f}, CLIP-V {c:.4f})"
                         for i, (r, f, g, c) in enumerate(zip(reward, fmt, rouge, scores)))
        return output_with_text(cls, text, reward, fmt, rouge)


class VANSStage2Reward(VansNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="VANSStage2Reward",
            hidden=HIDDEN,
            is_output_node=True,  # shows its result even when nothing is connected after it
            display_name="VANS Stage-2 Reward",
            category=CATEGORY,
            description=(
                "Joint-GRPO stage-2 reward of a group of videos for one caption: the sum of the group-normalised "
                "CLIP-V (against the ground-truth video) and CLIP-T (against the caption) rewards (r2 of the paper)."
            ),
            is_input_list=True,
            inputs=[
                io.Float.Input("clip_v", force_input=True, tooltip="CLIP-V of each video against the ground-truth video"),
                io.Float.Input("clip_t", force_input=True, tooltip="CLIP-T of each video against its caption, same order"),
            ],
            outputs=[io.Float.Output(display_name="reward", is_output_list=True, tooltip="r2 per video")],
        )

    @classmethod
    def execute(cls, clip_v, clip_t) -> io.NodeOutput:
        check_inputs(cls, locals())
        from ..vans.rewards import stage2_reward

        if len(clip_v) != len(clip_t):
            raise InputError(f"clip_v has {len(clip_v)} scores but clip_t has {len(clip_t)}; give one of each per video")
        result = stage2_reward([float(v) for v in clip_v], [float(t) for t in clip_t], group_size=len(clip_v))
        reward = _floats(result["reward"])
        return output_with_text(cls, format_scores("r2", reward), reward)


def _floats(values) -> list[float]:
    if hasattr(values, "tolist"):
        values = values.tolist()
    return [float(v) for v in values]


NODES = [VANSFormatReward, VANSRougeL, VANSBleu, VANSStage1Reward, VANSStage2Reward]
