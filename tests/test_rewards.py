"""Rewards and caption metrics: format rule, ROUGE-L, BLEU (hand-computed), group normalisation, stage rewards."""

import math

import pytest
import torch

from vans.errors import InputError
from vans.rewards import (
    bleu,
    bleu_tokenize,
    corpus_bleu,
    format_reward,
    group_advantages,
    group_normalize,
    rouge_l,
    rouge_l_batch,
    stage1_reward,
    stage2_reward,
)

CAT_PRED = "the cat sat on the mat"
CAT_REF = "the cat is on the mat"


# -- format --------------------------------------------------------------------------------------

@pytest.mark.parametrize("text", [
    "[Think]The pan is hot.[/Think][Ans]A hand adds cheese.[/Ans]",
    "  \n[Think]multi\nline[/Think]\n  [Ans]\nanswer\n[/Ans]\n",
])
def test_format_reward_accepts_the_template(text):
    assert format_reward(text) == 1.0


@pytest.mark.parametrize("text", [
    "[Think]reason[/Think][Ans][/Ans]",  # empty answer
    "[Think][/Think][Ans]an empty think block[/Ans]",  # the reasoning may not be dropped
    "[Think] \n [/Think][Ans]a whitespace-only think block[/Ans]",
    "[Think]reason[/Think][Ans] \n\t [/Ans]",  # whitespace-only answer
    "[Ans]no think block[/Ans]",
    "[Think]reason[/Think]",
    "Sure! [Think]reason[/Think][Ans]answer[/Ans]",  # text before
    "[Think]reason[/Think][Ans]answer[/Ans] Hope this helps.",  # text after
    "[Think]reason[/Think][Ans]a[/Ans][Ans]b[/Ans]",  # two answers
    "[Think]a[/Think][Think]b[/Think][Ans]c[/Ans]",  # two thinks
    "[Think]reason [Ans]x[/Ans][/Think][Ans]answer[/Ans]",  # answer hidden in the think block
    "[Ans]answer[/Ans][Think]reason[/Think]",  # wrong order
    "[think]reason[/think][ans]answer[/ans]",  # tags are case-sensitive
    "<think>reason</think><answer>answer</answer>",
    "just a caption",
    "",
])
def test_format_reward_rejects_everything_else(text):
    assert format_reward(text) == 0.0


# -- ROUGE-L -------------------------------------------------------------------------------------

def test_rouge_l_hand_computed():
    # LCS("the cat sat on the mat", "the cat is on the mat") = "the cat on the mat" = 5 of 6 tokens each way.
    assert rouge_l(CAT_PRED, CAT_REF) == pytest.approx(5 / 6)
    # 2-token LCS, P = 2/2, R = 2/4 → F1 = 2/3.
    assert rouge_l("cat mat", "the cat the mat") == pytest.approx(2 / 3)
    assert rouge_l("same words here", "Same words, here!") == pytest.approx(1.0)
    assert rouge_l("", CAT_REF) == 0.0
    assert rouge_l("dog", CAT_REF) == 0.0


def test_rouge_l_stems_words():
    assert rouge_l("a chef cuts onions", "a chef cut onion") == pytest.approx(1.0)


def test_rouge_l_batch_matches_single_and_checks_lengths():
    preds, refs = [CAT_PRED, "cat mat", "x"], [CAT_REF, "the cat the mat", "y"]
    assert rouge_l_batch(preds, refs) == pytest.approx([rouge_l(p, r) for p, r in zip(preds, refs)])
    with pytest.raises(InputError):
        rouge_l_batch(preds, refs[:2])


# -- BLEU ----------------------------------------------------------------------------------------

def test_bleu_tokenizer_lowercases_and_splits_punctuation():
    assert bleu_tokenize("A man, cuts the BREAD.") == ["a", "man", ",", "cuts", "the", "bread", "."]


def test_bleu_hand_computed_with_smoothing():
    # p1 = 5/6, p2 = 3/5, p3 = 1/4, p4 = 0/3 → smoothed 0.1/3; c = r = 6 → no brevity penalty.
    scores = bleu(CAT_PRED, CAT_REF)
    p = [5 / 6, 3 / 5, 1 / 4, 0.1 / 3]
    expected = [math.prod(p[:n]) ** (1 / n) for n in range(1, 5)]
    assert scores == pytest.approx(expected)
    assert scores[:3] == pytest.approx([5 / 6, math.sqrt(0.5), 0.5])


def test_bleu_brevity_penalty_and_short_hypothesis():
    # "the cat" vs 6 reference tokens: BP = exp(1 - 6/2); p1 = p2 = 1; no 3-/4-grams → ε / 1 each.
    bp = math.exp(1 - 3)
    assert bleu("the cat", CAT_REF) == pytest.approx([bp, bp, bp * 0.1 ** (1 / 3), bp * 0.01 ** (1 / 4)])


def test_bleu_clips_repeated_words_and_handles_edges():
    # "the" occurs once in the reference: 3 predicted "the" count as one match; c = 3 > r = 2 → no penalty.
    assert bleu("the the the", "the cat", max_n=1) == pytest.approx([1 / 3])
    # Same clipping, c = r = 3 → p1 = 1/3; with c = 2 < r = 3 the penalty is exp(1 - 3/2).
    assert bleu("the the the", "the cat sat", max_n=1) == pytest.approx([1 / 3])
    assert bleu("the the", "the cat sat", max_n=1) == pytest.approx([math.exp(1 - 3 / 2) / 2])
    assert bleu(CAT_REF, CAT_REF) == pytest.approx([1.0] * 4)
    assert bleu("", CAT_REF) == [0.0] * 4
    assert len(bleu(CAT_PRED, CAT_REF, max_n=2)) == 2
    with pytest.raises(InputError):
        bleu(CAT_PRED, CAT_REF, max_n=0)


def test_bleu_agrees_with_nltk_method1():
    nltk_bleu = pytest.importorskip("nltk.translate.bleu_score")
    smoothing = nltk_bleu.SmoothingFunction().method1
    pairs = [(CAT_PRED, CAT_REF), ("the cat", CAT_REF),
             ("A man, cuts the bread.", "the man cuts bread with a knife ."),
             ("a chef pours water into the pan and stirs", "the chef stirs the pan after pouring water")]
    for pred, ref in pairs:
        expected = [nltk_bleu.sentence_bleu([bleu_tokenize(ref)], bleu_tokenize(pred), weights=(1 / n,) * n,
                                            smoothing_function=smoothing) for n in range(1, 5)]
        assert bleu(pred, ref) == pytest.approx(expected)


def test_corpus_bleu_sums_counts_before_dividing():
    # matches/counts: p1 = (5+2)/(6+2), p2 = (3+1)/(5+1), p3 = 1/4, p4 = 0/3; c = 8, r = 12.
    scores = corpus_bleu([CAT_PRED, "the cat"], [CAT_REF, CAT_REF])
    bp = math.exp(1 - 12 / 8)
    p = [7 / 8, 4 / 6, 1 / 4]
    assert scores == pytest.approx([bp * math.prod(p[:n]) ** (1 / n) for n in range(1, 4)] + [0.0])
    assert corpus_bleu([CAT_REF], [CAT_REF]) == pytest.approx([1.0] * 4)
    with pytest.raises(InputError):
        corpus_bleu([CAT_PRED], [])


# -- group normalisation -------------------------------------------------------------------------

def test_group_normalize_hand_computed():
    out = group_normalize(torch.tensor([1.0, 2.0, 3.0, 4.0, 10.0, 0.0, 10.0, 0.0]), group_size=4)
    std1 = math.sqrt(1.25)  # population std of 1..4
    expected1 = [(x - 2.5) / (std1 + 1e-4) for x in (1, 2, 3, 4)]
    expected2 = [5 / (5 + 1e-4), -5 / (5 + 1e-4)] * 2
    assert out.tolist() == pytest.approx(expected1 + expected2, rel=1e-6)


def test_group_without_spread_gives_exact_zeros():
    rewards = torch.tensor([0.1, 0.1, 0.1, 0.7, 0.7, 0.7, 1.0, 2.0, 3.0])
    out = group_normalize(rewards, group_size=3)
    assert torch.equal(out[:6], torch.zeros(6))
    assert out[6:].abs().sum() > 0


def test_group_normalize_groups_are_independent_and_nan_stays_in_its_group():
    base = torch.tensor([1.0, 3.0, 2.0, 5.0])
    changed = torch.tensor([1.0, 3.0, 100.0, float("nan")])
    assert torch.equal(group_normalize(base, 2)[:2], group_normalize(changed, 2)[:2])
    assert torch.isnan(group_normalize(changed, 2)[2:]).all()


def test_group_normalize_keeps_float64_and_checks_shapes():
    assert group_normalize(torch.tensor([1.0, 2.0], dtype=torch.float64), 2).dtype == torch.float64
    assert group_normalize(torch.tensor([1, 2]), 2).dtype == torch.float32
    with pytest.raises(InputError):
        group_normalize(torch.ones(5), 2)
    with pytest.raises(InputError):
        group_normalize(torch.ones(2, 2), 2)
    assert group_advantages is group_normalize


# -- stage rewards -------------------------------------------------------------------------------

GOOD = "[Think]The chicken is glazed.[/Think][Ans]a hand sprinkles cheese on the chicken[/Ans]"
GT = "a hand sprinkles cheese on the chicken"


def test_stage1_reward_is_the_sum_of_normalised_terms():
    responses = [GOOD, "a hand sprinkles cheese", "[Think]x[/Think][Ans]a dog runs[/Ans]", GOOD]
    clip_v = torch.tensor([0.5, 0.7, 0.6, 0.9])
    out = stage1_reward(responses, [GT] * 4, clip_v, group_size=2)

    assert out["format"].tolist() == [1.0, 0.0, 1.0, 1.0]
    # ROUGE-L sees the extracted caption, not the think text: the first response matches the GT exactly.
    assert out["rouge_l"][0] == pytest.approx(1.0)
    assert out["rouge_l"][1] == pytest.approx(rouge_l("a hand sprinkles cheese", GT))
    assert torch.equal(out["clip_v"], clip_v)
    expected = sum(group_normalize(out[name], 2) for name in ("format", "rouge_l", "clip_v"))
    assert torch.allclose(out["reward"], expected)
    # Group 2: format has no spread → its normalised term is exactly 0 there.
    assert torch.equal(out["format_norm"][2:], torch.zeros(2))
    assert out["num_skipped"] == 0 and not out["skipped_groups"].any()
    assert out["reward"][0] > out["reward"][1] and out["reward"][3] > out["reward"][2]


def test_stage1_reward_accepts_one_gt_caption_per_group():
    responses = [GOOD, "[Think]x[/Think][Ans]a dog runs[/Ans]"] * 2
    per_group = stage1_reward(responses, [GT, "a dog runs"], [0.1, 0.2, 0.3, 0.4], group_size=2)
    per_sample = stage1_reward(responses, [GT, GT, "a dog runs", "a dog runs"], [0.1, 0.2, 0.3, 0.4], group_size=2)
    assert torch.equal(per_group["reward"], per_sample["reward"])
    with pytest.raises(InputError):
        stage1_reward(responses, [GT] * 3, [0.1, 0.2, 0.3, 0.4], group_size=2)
    with pytest.raises(InputError):
        stage1_reward(responses, [GT] * 4, [0.1, 0.2, 0.3], group_size=2)


def test_stage1_nan_skips_only_its_group():
    responses = [GOOD, "nope", GOOD, "nope", GOOD, "nope"]
    clip_v = torch.tensor([0.5, 0.7, float("nan"), 0.7, 0.2, 0.3])
    out = stage1_reward(responses, [GT] * 6, clip_v, group_size=2)
    assert out["skipped_groups"].tolist() == [False, True, False]
    assert out["num_skipped"] == 1
    for key in ("reward", "format_norm", "rouge_l_norm", "clip_v_norm"):
        assert torch.isfinite(out[key]).all()
        assert torch.equal(out[key][2:4], torch.zeros(2))
    alone = stage1_reward(responses[:2], [GT] * 2, clip_v[:2], group_size=2)
    assert torch.equal(out["reward"][:2], alone["reward"])


def test_stage2_reward_sums_normalised_clip_terms():
    clip_v = torch.tensor([0.70, 0.80, 0.75, 0.75])
    clip_t = torch.tensor([0.30, 0.20, 0.25, 0.35])
    out = stage2_reward(clip_v, clip_t, group_size=2)
    expected = group_normalize(clip_v, 2) + group_normalize(clip_t, 2)
    assert torch.allclose(out["reward"], expected)
    # Group 1: both terms disagree with equal spread → they cancel. Group 2: CLIP-V is flat → CLIP-T decides.
    assert out["reward"][:2].abs().max() < 1e-3
    assert torch.equal(out["clip_v_norm"][2:], torch.zeros(2))
    assert out["reward"][3] > out["reward"][2]

    skipped = stage2_reward([0.7, float("inf")], [0.3, 0.2], group_size=2)
    assert skipped["num_skipped"] == 1 and torch.equal(skipped["reward"], torch.zeros(2))
    with pytest.raises(InputError):
        stage2_reward([0.7, 0.8], [0.3], group_size=2)
