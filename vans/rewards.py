"""Rewards of Joint-GRPO and the caption metrics of the VANS tables (pure Python / torch, no model).

Text terms:

* ``format_reward``: 1 iff the whole response is ``[Think]…[/Think][Ans]…[/Ans]`` with a non-empty answer
  (a lax match would let an empty answer score 1).
* ``rouge_l``: ROUGE-L F1 from the ``rouge-score`` package.
* ``bleu`` / ``corpus_bleu``: cumulative BLEU@1..4, implemented here (see ``bleu`` for the choices).

Group terms: ``group_normalize`` is the one GRPO normalisation, (r − group mean) / (population std + eps)
per consecutive group of G samples. ``stage1_reward`` and ``stage2_reward`` normalise each term inside its
group and add them (all λ = 1, "a sum of the normalized individual rewards", VANS App. B.1). The CLIP terms
come in as numbers from ``vans.clip``; this module never loads a model.

All group outputs are float32 CPU tensors: B = number of groups × G is small, and the trainer logs them.
"""

from __future__ import annotations

import functools
import math
import re
from collections import Counter
from typing import Sequence

import torch

from .errors import InputError

# ---------------------------------------------------------------------------------------------
# Format reward
# ---------------------------------------------------------------------------------------------

def format_reward(text: str) -> float:
    """1.0 iff the response follows the ``[Think]…[/Think][Ans]…[/Ans]`` template with both blocks
    non-empty (``vans.prompts.is_well_formed``, the one format rule), else 0.0. Deliberately stricter than
    the caption extraction, which falls back to the whole text."""
    from .prompts import is_well_formed

    return 1.0 if is_well_formed(text) else 0.0


def extract_caption(text: str) -> str:
    """The caption that the video model renders for this response (``vans.prompts`` rule, lenient)."""
    from .prompts import parse_response

    return parse_response(text).caption


# ---------------------------------------------------------------------------------------------
# ROUGE-L
# ---------------------------------------------------------------------------------------------


# The variant, named in every evaluation table (the paper names none): rouge-score's "rougeL" (LCS over the
# whole text, not the sentence-split "rougeLsum"), F-measure with beta 1, Porter stemmer, lowercase [a-z0-9] tokens.
ROUGE_L_VARIANT = "rouge-score rougeL F-measure (beta 1, LCS over the whole text), Porter stemmer, lowercase [a-z0-9] tokens"


@functools.lru_cache(maxsize=1)
def _rouge_l_scorer():
    """One scorer per process. Porter stemming on: a reward should not punish "cuts" vs "cut", and the
    paper leaves the tokenizer open. rouge-score keeps only [a-z0-9] tokens, lowercased."""
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(pred: str, ref: str) -> float:
    """ROUGE-L F-measure (β = 1, LCS over the whole text) of a predicted caption against the reference."""
    return float(_rouge_l_scorer().score(ref, pred)["rougeL"].fmeasure)


def rouge_l_batch(preds: Sequence[str], refs: Sequence[str]) -> list[float]:
    """``rouge_l`` for aligned lists (one scorer for all pairs)."""
    _check_same_length(preds, refs, "predictions", "references")
    scorer = _rouge_l_scorer()
    return [float(scorer.score(r, p)["rougeL"].fmeasure) for p, r in zip(preds, refs)]


# ---------------------------------------------------------------------------------------------
# BLEU
# ---------------------------------------------------------------------------------------------

_BLEU_TOKEN = re.compile(r"\w+|[^\w\s]")

# Chen & Cherry (2014) smoothing method 1: an order with no matching n-gram gets precision ε / count
# instead of 0, so one missing 4-gram does not zero a sentence's BLEU@4. ε = 0.1 as in NLTK's method1.
BLEU_SMOOTHING_EPSILON = 0.1


def bleu_tokenize(text: str) -> list[str]:
    """Lowercase; words (letters, digits, underscore) and each punctuation mark are separate tokens."""
    return _BLEU_TOKEN.findall(text.lower())


def _ngram_counts(tokens: Sequence[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def _clipped_matches(pred: Sequence[str], ref: Sequence[str], max_n: int) -> tuple[list[int], list[int]]:
    """Per order n: (n-grams of pred also in ref, clipped by their ref count; n-grams of pred)."""
    matches, totals = [], []
    for n in range(1, max_n + 1):
        pred_counts, ref_counts = _ngram_counts(pred, n), _ngram_counts(ref, n)
        matches.append(sum(min(c, ref_counts[g]) for g, c in pred_counts.items()))
        totals.append(sum(pred_counts.values()))
    return matches, totals


def _brevity_penalty(pred_len: int, ref_len: int) -> float:
    if pred_len == 0:
        return 0.0
    return 1.0 if pred_len > ref_len else math.exp(1.0 - ref_len / pred_len)


def _cumulative_bleu(log_precisions: Sequence[float], penalty: float) -> list[float]:
    """BLEU@n for n = 1..N: penalty · exp(mean of the first n log precisions)."""
    scores, running = [], 0.0
    for n, log_p in enumerate(log_precisions, start=1):
        running += log_p
        scores.append(penalty * math.exp(running / n) if math.isfinite(running) else 0.0)
    return scores


def bleu(pred: str, ref: str, max_n: int = 4) -> list[float]:
    """Sentence-level cumulative BLEU@1..max_n of one prediction against one reference.

    Tokens from ``bleu_tokenize``; modified (clipped) n-gram precisions; uniform weights 1/n; brevity
    penalty exp(1 − r/c) when c ≤ r. Smoothing: Chen & Cherry method 1 (``BLEU_SMOOTHING_EPSILON``); an
    order with no n-grams at all (prediction shorter than n) counts as ε / 1, as in NLTK. An empty
    prediction scores 0.
    """
    if max_n < 1:
        raise InputError(f"BLEU max_n must be at least 1 (got {max_n})")
    pred_tokens, ref_tokens = bleu_tokenize(pred), bleu_tokenize(ref)
    if not pred_tokens:
        return [0.0] * max_n
    matches, totals = _clipped_matches(pred_tokens, ref_tokens, max_n)
    log_precisions = [
        math.log((m if m > 0 else BLEU_SMOOTHING_EPSILON) / max(t, 1)) for m, t in zip(matches, totals)
    ]
    return _cumulative_bleu(log_precisions, _brevity_penalty(len(pred_tokens), len(ref_tokens)))


def corpus_bleu(preds: Sequence[str], refs: Sequence[str], max_n: int = 4) -> list[float]:
    """Corpus-level cumulative BLEU@1..max_n (Papineni et al.): matches, n-gram counts and lengths are
    summed over all pairs before taking precisions and one brevity penalty. No smoothing: an order with no
    match anywhere in the corpus gives 0 for that BLEU@n and above."""
    _check_same_length(preds, refs, "predictions", "references")
    if max_n < 1:
        raise InputError(f"BLEU max_n must be at least 1 (got {max_n})")
    matches, totals = [0] * max_n, [0] * max_n
    pred_len = ref_len = 0
    for pred, ref in zip(preds, refs):
        pred_tokens, ref_tokens = bleu_tokenize(pred), bleu_tokenize(ref)
        pair_matches, pair_totals = _clipped_matches(pred_tokens, ref_tokens, max_n)
        matches = [a + b for a, b in zip(matches, pair_matches)]
        totals = [a + b for a, b in zip(totals, pair_totals)]
        pred_len += len(pred_tokens)
        ref_len += len(ref_tokens)
    log_precisions = [math.log(m / t) if m > 0 else -math.inf for m, t in zip(matches, totals)]
    return _cumulative_bleu(log_precisions, _brevity_penalty(pred_len, ref_len))


# ---------------------------------------------------------------------------------------------
# Group normalisation (GRPO advantages)
# ---------------------------------------------------------------------------------------------


def group_normalize(rewards: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """(r − group mean) / (population std + eps) for each consecutive group of ``group_size`` samples.

    Population std (1/G) as VANS Eq. 1; eps = 1e-4 as Video-R1 / Flow-GRPO so near-identical rewards are
    not blown up. A group whose rewards are all equal gives exactly 0 (not rounding noise): it carries no
    preference, so it must contribute no gradient. NaN propagates to its own group only.
    """
    rewards = torch.as_tensor(rewards)
    grouped = _as_groups(rewards, group_size).to(torch.promote_types(rewards.dtype, torch.float32))
    mean = grouped.mean(dim=1, keepdim=True)
    std = grouped.std(dim=1, unbiased=False, keepdim=True)
    normalized = (grouped - mean) / (std + eps)
    no_spread = grouped.amax(dim=1, keepdim=True) == grouped.amin(dim=1, keepdim=True)
    normalized = torch.where(no_spread, torch.zeros_like(normalized), normalized)
    return normalized.reshape(rewards.shape)


# The advantage of GRPO is this same normalisation; one implementation, two names.
group_advantages = group_normalize


def _as_groups(values: torch.Tensor, group_size: int) -> torch.Tensor:
    if values.ndim != 1:
        raise InputError(f"rewards must be a 1-D tensor of length groups × group_size (got shape {tuple(values.shape)})")
    if group_size < 1 or values.numel() % group_size != 0:
        raise InputError(
            f"{values.numel()} rewards cannot be split into groups of group_size={group_size}; "
            "pass all G samples of every prompt"
        )
    return values.reshape(-1, group_size)


def _check_same_length(a: Sequence, b: Sequence, name_a: str, name_b: str) -> None:
    if len(a) != len(b):
        raise InputError(f"got {len(a)} {name_a} but {len(b)} {name_b}; they must be aligned one to one")


# ---------------------------------------------------------------------------------------------
# Stage rewards
# ---------------------------------------------------------------------------------------------


def combine_group_rewards(terms: dict[str, torch.Tensor], group_size: int, eps: float = 1e-4) -> dict:
    """Sum of per-group normalised terms, with groups that hold a non-finite value skipped.

    Returns the raw terms (as given), ``<name>_norm`` for each term, ``reward`` (the sum), and
    ``skipped_groups`` (bool [num_groups], True where any term of the group was NaN/inf) with
    ``num_skipped``. A skipped group's normalised terms and reward are exactly 0, so it contributes no
    gradient and cannot poison the batch; a term with zero spread in a group normalises to 0 there (it
    ranks nobody), so the other terms decide that group's ranking alone.
    """
    raw = {name: torch.as_tensor(values, dtype=torch.float32).detach().cpu().reshape(-1)
           for name, values in terms.items()}
    sizes = {name: values.numel() for name, values in raw.items()}
    if len(set(sizes.values())) != 1:
        raise InputError(f"reward terms have different lengths {sizes}; each needs one value per sample")
    nonfinite = torch.zeros(next(iter(raw.values())).numel(), dtype=torch.bool)
    for values in raw.values():
        nonfinite |= ~torch.isfinite(values)
    skipped_groups = _as_groups(nonfinite, group_size).any(dim=1)
    keep = (~skipped_groups).repeat_interleave(group_size)

    out: dict = dict(raw)
    reward = torch.zeros_like(nonfinite, dtype=torch.float32)
    for name, values in raw.items():
        finite = torch.where(keep, values, torch.zeros_like(values))
        normalized = torch.where(keep, group_normalize(finite, group_size, eps), torch.zeros_like(values))
        out[f"{name}_norm"] = normalized
        reward = reward + normalized
    out["reward"] = reward
    out["skipped_groups"] = skipped_groups
    out["num_skipped"] = int(skipped_groups.sum())
    return out


def stage1_reward(
    responses: Sequence[str],
    gt_captions: Sequence[str],
    clip_v_scores: Sequence[float] | torch.Tensor,
    group_size: int,
    eps: float = 1e-4,
) -> dict:
    """Stage-1 reward r1 = norm(format) + norm(ROUGE-L) + norm(CLIP-V) per group (VANS §6.2).

    ``responses``: B = groups × G VLM outputs, group-major (the G samples of a prompt are consecutive).
    ``gt_captions``: one per response, or one per group. ROUGE-L compares the caption the video model
    actually rendered (``extract_caption``) with the GT caption. ``clip_v_scores``: CLIP-V of each rendered
    video against the GT video. Returns ``combine_group_rewards``'s dict with the terms ``format``,
    ``rouge_l`` and ``clip_v``; the GRPO advantage is ``group_normalize(out["reward"], G)``.
    """
    refs = _per_sample(gt_captions, len(responses), group_size, "GT captions")
    captions = [extract_caption(text) for text in responses]
    terms = {
        "format": torch.tensor([format_reward(text) for text in responses], dtype=torch.float32),
        "rouge_l": torch.tensor(rouge_l_batch(captions, refs), dtype=torch.float32),
        "clip_v": _scores(clip_v_scores, len(responses), "CLIP-V scores"),
    }
    return combine_group_rewards(terms, group_size, eps)


def stage2_reward(
    clip_v_scores: Sequence[float] | torch.Tensor,
    clip_t_scores: Sequence[float] | torch.Tensor,
    group_size: int,
    eps: float = 1e-4,
) -> dict:
    """Stage-2 reward r2 = norm(CLIP-V) + norm(CLIP-T) per group (VANS §6.3).

    CLIP-T is taken against the anchor caption; without it the video model learns to copy the input
    (Table 2). Raw cosines or CLIPScore give the same normalised reward (up to eps) while all cosines
    are positive: the normalisation removes the 2.5 scale. Returns ``combine_group_rewards``'s dict with the
    terms ``clip_v`` and ``clip_t``.
    """
    clip_v = torch.as_tensor(clip_v_scores, dtype=torch.float32).reshape(-1)
    terms = {"clip_v": clip_v, "clip_t": _scores(clip_t_scores, clip_v.numel(), "CLIP-T scores")}
    return combine_group_rewards(terms, group_size, eps)


def _per_sample(values: Sequence[str], count: int, group_size: int, name: str) -> list[str]:
    """Accept one value per sample or one per group (repeated over its G samples)."""
    values = list(values)
    if len(values) == count:
        return values
    if group_size > 0 and len(values) * group_size == count:
        return [v for v in values for _ in range(group_size)]
    raise InputError(f"got {len(values)} {name} for {count} samples; give one per sample or one per group")


def _scores(values, count: int, name: str) -> torch.Tensor:
    scores = torch.as_tensor(values, dtype=torch.float32).detach().cpu().reshape(-1)
    if scores.numel() != count:
        raise InputError(f"got {scores.numel()} {name} for {count} samples; give one per sample")
    return scores
