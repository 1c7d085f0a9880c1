"""The VANS prompt: system text, chat layout, question checks and ``[Think]…[/Think][Ans]…[/Ans]`` parsing.

Only the ``[Ans]`` text (the caption) reaches the video model; the ``[Think]`` text is reasoning shown
to the user. Parsing follows the official ``extract_caption``: the first ``[Ans]…[/Ans]`` match,
stripped, and the whole response when there is none, so a model that forgets the tags still yields a
caption. ``is_well_formed`` is the stricter rule behind the format reward: the whole
response is exactly one non-empty think block followed by one non-empty answer block.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import InputError

# Two wordings of the VANS system prompt. "official" is the official code's default
# (``MLLMAgentConfig.system_prompt`` in KlingAIResearch/VANS ``vans/models_mllm/agent_mllm.py``, used for
# SFT and inference, so the released vlm.safetensors was trained with it) and is the default everywhere.
# "paper" is the text printed in the paper's App. C.2, one word longer ("your detailed description").
OFFICIAL_SYSTEM_PROMPT = (
    "You will be given a video. Your task is to predict the next event based on the input video and the "
    "user's instructions. Please begin by providing your detailed reasoning between the [Think][/Think] tags, "
    "followed by your description of the next event within the [Ans][/Ans] tags."
)
PAPER_SYSTEM_PROMPT = OFFICIAL_SYSTEM_PROMPT.replace("followed by your description", "followed by your detailed description")
SYSTEM_PROMPTS = {"official": OFFICIAL_SYSTEM_PROMPT, "paper": PAPER_SYSTEM_PROMPT}
DEFAULT_SYSTEM_PROMPT = "official"
SYSTEM_PROMPT = SYSTEM_PROMPTS[DEFAULT_SYSTEM_PROMPT]


def system_prompt_text(name: str) -> str:
    """The text of a system prompt named "official" or "paper", or ``InputError`` naming the choices."""
    if name not in SYSTEM_PROMPTS:
        raise InputError(f"system_prompt={name!r}: use one of {', '.join(SYSTEM_PROMPTS)} "
                         f"(official = the wording the released VANS weights were trained with)")
    return SYSTEM_PROMPTS[name]


# A question is a sentence or a short paragraph. 2,000 characters (~500 tokens) is far above the paper's
# examples and keeps the prompt well below the VLM context next to ~1,000 video tokens. Longer input is
# refused rather than truncated: a silently cut question changes its meaning.
MAX_QUESTION_CHARS = 2000

_ANS = re.compile(r"\[Ans\](.*?)\[/Ans\]", re.DOTALL)
_THINK = re.compile(r"\[Think\](.*?)\[/Think\]", re.DOTALL)
# Block contents may not contain any of the four tags: otherwise a non-greedy match could swallow a second
# block ("[Ans]a[/Ans][Ans]b[/Ans]" would read as one answer "a[/Ans][Ans]b").
_NO_TAG = r"(?:(?!\[/?(?:Think|Ans)\]).)*"
_TEMPLATE = re.compile(rf"\[Think\](?P<think>{_NO_TAG})\[/Think\]\s*\[Ans\](?P<ans>{_NO_TAG})\[/Ans\]", re.DOTALL)


@dataclass(frozen=True)
class ParsedResponse:
    think: str  # the first [Think] block, stripped; "" when there is none
    caption: str  # the first [Ans] block, stripped; the whole response when there is none (official fallback)
    raw: str  # the response as generated
    well_formed: bool  # exactly "[Think]…[/Think][Ans]…[/Ans]", both blocks non-empty, nothing around them


def parse_response(text: str) -> ParsedResponse:
    """Split a VLM response into reasoning and caption (see the module docstring for the rules)."""
    ans = _ANS.search(text)
    think = _THINK.search(text)
    return ParsedResponse(
        think=think.group(1).strip() if think else "",
        caption=ans.group(1).strip() if ans else text.strip(),
        raw=text,
        well_formed=is_well_formed(text),
    )


def is_well_formed(text: str) -> bool:
    """The format rule (the format reward is 1 exactly when this holds): the stripped response is one
    non-empty ``[Think]`` block, then one non-empty ``[Ans]`` block, whitespace between them and nothing
    else; tags are case-sensitive and no block holds another tag. An empty think block fails too, so GRPO
    cannot buy the format reward by dropping the reasoning users see."""
    match = _TEMPLATE.fullmatch(text.strip())
    return match is not None and bool(match.group("think").strip()) and bool(match.group("ans").strip())


def validate_question(question: str) -> str:
    """Return the question stripped of surrounding whitespace, or raise ``InputError`` naming the fix."""
    if not isinstance(question, str):
        raise InputError(f"question must be text, got {type(question).__name__}; type what you want to know about the video")
    stripped = question.strip()
    if not stripped:
        raise InputError("question is empty; type what you want to know about the video")
    if len(stripped) > MAX_QUESTION_CHARS:
        raise InputError(
            f"question is too long ({len(stripped):,} characters, limit {MAX_QUESTION_CHARS:,}); "
            "shorten it to one or two sentences about the video"
        )
    return stripped


def build_messages(question: str, *, system_prompt: str = SYSTEM_PROMPT) -> list[dict]:
    """Chat layout of the official code: system message, then one user turn [video, question].

    The video item carries no data: the frames go to the processor separately, the chat template only
    needs to place the ``<|vision_start|><|video_pad|><|vision_end|>`` marker before the question.
    """
    question = validate_question(question)
    return [
        {"role": "system", "content": [{"type": "text", "text": system_prompt}]},
        {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]},
    ]
