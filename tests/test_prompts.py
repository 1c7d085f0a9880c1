import pytest

from vans.errors import InputError
from vans.prompts import (
    MAX_QUESTION_CHARS,
    OFFICIAL_SYSTEM_PROMPT,
    PAPER_SYSTEM_PROMPT,
    SYSTEM_PROMPT,
    build_messages,
    is_well_formed,
    parse_response,
    system_prompt_text,
    validate_question,
)


def test_default_system_prompt_is_the_official_code_text():
    # KlingAIResearch/VANS vans/models_mllm/agent_mllm.py, MLLMAgentConfig.system_prompt (SFT and inference)
    assert SYSTEM_PROMPT == OFFICIAL_SYSTEM_PROMPT == system_prompt_text("official") == (
        "You will be given a video. Your task is to predict the next event based on the input video and the "
        "user's instructions. Please begin by providing your detailed reasoning between the [Think][/Think] tags, "
        "followed by your description of the next event within the [Ans][/Ans] tags."
    )
    # The paper's App. C.2 wording adds a second "detailed"; selectable by name.
    assert system_prompt_text("paper") == PAPER_SYSTEM_PROMPT == (
        "You will be given a video. Your task is to predict the next event based on the input video and the "
        "user's instructions. Please begin by providing your detailed reasoning between the [Think][/Think] tags, "
        "followed by your detailed description of the next event within the [Ans][/Ans] tags."
    )
    with pytest.raises(InputError, match="official, paper"):
        system_prompt_text("detailed")


def test_parse_well_formed_response():
    text = "[Think] The chicken is glazed with ketchup. [/Think][Ans] A hand sprinkles cheese over it. [/Ans]"
    parsed = parse_response(text)
    assert parsed.think == "The chicken is glazed with ketchup."
    assert parsed.caption == "A hand sprinkles cheese over it."
    assert parsed.raw == text
    assert parsed.well_formed


def test_parse_multiline_blocks_and_whitespace_between():
    text = "  [Think]line one\nline two[/Think]\n\n[Ans]\nfirst\nsecond\n[/Ans]\n"
    parsed = parse_response(text)
    assert parsed.think == "line one\nline two"
    assert parsed.caption == "first\nsecond"
    assert parsed.well_formed


def test_missing_answer_tags_fall_back_to_whole_response():
    parsed = parse_response("  The man stands up and leaves.  \n")
    assert parsed.caption == "The man stands up and leaves."
    assert parsed.think == ""
    assert not parsed.well_formed


def test_first_answer_block_wins_and_extra_blocks_are_not_well_formed():
    text = "[Think]a[/Think][Ans]first[/Ans][Ans]second[/Ans]"
    parsed = parse_response(text)
    assert parsed.caption == "first"
    assert not parsed.well_formed


def test_answer_without_think_is_parsed_but_not_well_formed():
    parsed = parse_response("[Ans] only an answer [/Ans]")
    assert parsed.caption == "only an answer"
    assert parsed.think == ""
    assert not parsed.well_formed


@pytest.mark.parametrize("text", [
    "[Think]reasoning[/Think][Ans]   [/Ans]",  # empty answer must not earn the format reward
    "[Think] [/Think][Ans]caption[/Ans]",
    "prefix [Think]r[/Think][Ans]c[/Ans]",
    "[Think]r[/Think][Ans]c[/Ans] suffix",
    "[Ans]c[/Ans][Think]r[/Think]",
    "[Think]r[/Think][Ans]c",
    "<think>r</think><answer>c</answer>",
    "[Think]x[Think]y[/Think][Ans]a[/Ans]",  # a tag inside a block
])
def test_format_check_rejects(text):
    assert not is_well_formed(text)


def test_unclosed_answer_falls_back_to_whole_text():
    parsed = parse_response("[Think]r[/Think][Ans]cut off")
    assert parsed.think == "r"
    assert parsed.caption == "[Think]r[/Think][Ans]cut off"


@pytest.mark.parametrize("question", ["", "   ", "\n\t "])
def test_empty_question_is_refused(question):
    with pytest.raises(InputError, match="question is empty; type what you want to know about the video"):
        validate_question(question)


def test_very_long_question_names_the_limit():
    with pytest.raises(InputError) as info:
        validate_question("x" * 100_000)
    message = str(info.value)
    assert "limit 2,000" in message and "100,000 characters" in message
    assert "\n" not in message


def test_question_limit_boundary_and_stripping():
    assert MAX_QUESTION_CHARS == 2000
    assert validate_question("  " + "a" * MAX_QUESTION_CHARS + "  ") == "a" * MAX_QUESTION_CHARS
    with pytest.raises(InputError):
        validate_question("a" * (MAX_QUESTION_CHARS + 1))


def test_non_text_question_is_refused():
    with pytest.raises(InputError, match="question must be text"):
        validate_question(None)


def test_build_messages_layout():
    messages = build_messages("  What will happen next?  ")
    assert [m["role"] for m in messages] == ["system", "user"]
    assert messages[0]["content"] == [{"type": "text", "text": SYSTEM_PROMPT}]
    assert messages[1]["content"] == [{"type": "video"}, {"type": "text", "text": "What will happen next?"}]
    custom = build_messages("q", system_prompt=PAPER_SYSTEM_PROMPT)
    assert custom[0]["content"][0]["text"] == PAPER_SYSTEM_PROMPT


def test_build_messages_validates():
    with pytest.raises(InputError):
        build_messages(" ")
