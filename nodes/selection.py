"""Reward-guided selection at inference: keep the best of N candidate answer videos.

The paper samples one video per caption; with a reward at hand (CLIP-T against the caption, CLIP-V
against a reference) a workflow can sample N and keep the best. This node only selects: the
rewards come from the reward nodes.
"""

from __future__ import annotations

from comfy_api.latest import io

from .batching import best_index, format_scores, split_videos
from .display import HIDDEN, output_with_text
from .host import VansNode, check_inputs


class VANSBestOfN(VansNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="VANSBestOfN",
            hidden=HIDDEN,
            display_name="VANS Best of N",
            category="VANS/rewards",
            description="Pass on the candidate video with the highest reward (NaN rewards never win, ties go to the first).",
            is_input_list=True,
            inputs=[
                io.Image.Input("videos", tooltip=(
                    "Candidate videos: one IMAGE batch of N videos of equal length (KSampler batch_size N, then "
                    "VAE Decode) or a list of N videos")),
                io.Float.Input("rewards", force_input=True, tooltip=(
                    "One reward per candidate, in the same order (e.g. from VANS CLIP-T Score); higher is better")),
            ],
            outputs=[
                io.Image.Output(display_name="video", tooltip="The best candidate's frames"),
                io.Int.Output(display_name="index", tooltip="Its position among the candidates, from 0"),
                io.Float.Output(display_name="reward", tooltip="Its reward"),
            ],
        )

    @classmethod
    def execute(cls, videos, rewards) -> io.NodeOutput:
        check_inputs(cls, locals())
        scores = [float(r) for r in rewards]
        candidates = split_videos(videos, len(scores))
        best = best_index(scores)
        text = f"best: #{best} of {len(scores)}\n" + format_scores("reward", scores)
        return output_with_text(cls, text, candidates[best], best, scores[best])


NODES = [VANSBestOfN]
