"""CrossFit's task metrics, a strict exact match, and the average relative gain (ARG), as pure functions.

Every metric takes `predictions` (one string per example) and `references` (one or more
reference strings per example) and returns a Python float; higher is better. EM, ACC, QA-F1,
Classification-F1, Rouge-L and Strict-EM lie in [0, 1]; Matthew-Correlation and
Pearson-Correlation in [-1, 1]. The CrossFit metrics return what CrossFit's own
`dataloader/metrics.py` (Ye, Lin & Ren 2021; with the `rouge` 1.0.0 package, scikit-learn and
scipy) returns, re-implemented without those packages; where CrossFit raises or returns NaN, the
metric's docstring says what we return instead. Strict-EM is ours.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from itertools import chain

from moe_mtl.data.tasks import METRICS

from ..errors import UsageError

POSITIVE_LABEL = "acceptable"
"""The positive class of Matthew-Correlation (glue-cola's labels are "acceptable"/"unacceptable")."""

UNPARSEABLE_FLOAT = 3.0
"""Pearson-Correlation's value for a prediction that is not a finite float. CrossFit uses NaN,
which turns the whole score into NaN; the task-level MoE code substitutes 3.0, and so do we."""

ROUGE_F_EPSILON = 1e-8
"""Added to P + R in Rouge-L's F-measure, as the `rouge` package does: an exact match scores 1 − 5e-9."""

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Lower-case, remove punctuation, remove the articles a/an/the, collapse white space (SQuAD's order)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """EM: mean over examples of max over references of [normalize(pred) == normalize(ref)]."""
    return _best_over_references(
        lambda p, r: float(normalize_answer(p) == normalize_answer(r)), predictions, references
    )


def strict_exact_match(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Strict-EM: mean over examples of max over references of [pred.strip() == ref.strip()].

    Only surrounding white space is ignored: case, punctuation, articles, brackets and signs all
    count. For answers that are made of them (BIG-Bench Hard's dyck_languages "] ) }",
    arithmetic "-5", "(A)"), where EM's normalisation would accept "5" for "-5" or "" for "] ) }".
    """
    return _best_over_references(lambda p, r: float(p.strip() == r.strip()), predictions, references)


def accuracy(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """ACC: mean over examples of max over references of [pred.lower() == ref.lower()]; no other normalisation."""
    return _best_over_references(lambda p, r: float(p.lower() == r.lower()), predictions, references)


def qa_f1(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """QA-F1: bag-of-tokens F1 of normalised prediction and reference, max over references, mean over examples.

    As in SQuAD v1, a pair with no token in common scores 0, even when both are empty.
    """
    return _best_over_references(
        lambda p, r: _token_f1(normalize_answer(p).split(), normalize_answer(r).split()), predictions, references
    )


def classification_f1(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Classification-F1: macro-F1 over label strings; the gold label is an example's first reference.

    The label set is the union of gold and predicted labels, as sklearn's
    `f1_score(average="macro")` (which CrossFit calls) uses: a label the model invents but
    never gets right counts as one more class with F1 0, so spraying wrong labels is
    penalised. Labels compare as exact strings.
    """
    _check_inputs(predictions, references)
    gold = [refs[0] for refs in references]
    true_pos: Counter[str] = Counter(g for g, p in zip(gold, predictions, strict=True) if g == p)
    gold_count, predicted_count = Counter(gold), Counter(predictions)
    labels = gold_count.keys() | predicted_count.keys()
    # Per label F1 = 2TP / (2TP + FP + FN) = 2TP / (#gold + #predicted); never 0/0 as the label occurs.
    return _mean(2 * true_pos[label] / (gold_count[label] + predicted_count[label]) for label in labels)


def rouge_l(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Rouge-L: the `rouge` 1.0.0 package's summary-level ROUGE-L F, max over references, mean over examples.

    As CrossFit computes it (`Rouge().get_scores(prediction, reference, avg=True)["rouge-l"]["f"]`):

    - A text splits into sentences at "." only (empty pieces dropped, white space inside a piece
      collapsed) and a sentence into words at spaces. Nothing else is normalised: case counts and
      other punctuation stays on its word ("Cat" ≠ "cat", "cat!" ≠ "cat", but "cat." = "cat"). A
      piece of only white space is a sentence of one empty word ("cat. " has words "cat" and "").
    - The overlap is the number of distinct words in the union, over every pair of a reference
      sentence and a prediction sentence, of the words of the pair's longest common subsequence
      (`_lcs_words`). P = overlap / distinct prediction words, R = overlap / distinct reference
      words, F = 2PR / (P + R + `ROUGE_F_EPSILON`).
    - A prediction of nothing but `string.punctuation` (or nothing) scores 0 (CrossFit's rule).
    - A reference without a sentence ("" or only full stops) scores 0. CrossFit raises
      ValueError("Reference is empty.") there, which fails the whole task; scoring it 0 keeps the
      example's other references and the task's other examples counting.
    """
    return _best_over_references(_rouge_l_pair, predictions, references)


def matthew_correlation(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Matthew-Correlation: MCC of [pred.strip() == "acceptable"] against [first reference == "acceptable"].

    As CrossFit: the prediction's surrounding white space is ignored and nothing else ("Acceptable"
    and "garbage" count as negative); the gold label compares exactly. 0.0 when the denominator
    is 0 (either side constant), as sklearn's `matthews_corrcoef` returns.
    """
    _check_inputs(predictions, references)
    pairs = Counter(
        (refs[0] == POSITIVE_LABEL, p.strip() == POSITIVE_LABEL)
        for p, refs in zip(predictions, references, strict=True)
    )
    tp, tn, fp, fn = pairs[True, True], pairs[False, False], pairs[False, True], pairs[True, False]
    denominator = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return _clip((tp * tn - fp * fn) / denominator) if denominator else 0.0


def pearson_correlation(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Pearson-Correlation: Pearson r of float(pred) against float(first reference), as scipy's `pearsonr`.

    Where CrossFit returns NaN we return a number, so that a task's score and ARG stay defined:
    a prediction that is not a finite float (Python's `float` rejects it, or gives ±inf or NaN)
    becomes `UNPARSEABLE_FLOAT` (3.0), as in the task-level MoE code; and when either side is
    constant (every value equal, or a single example) the result is 0.0, the value sklearn's MCC
    takes in the same case. A reference that is not a finite float raises `ValueError` (CrossFit
    raises too).
    """
    _check_inputs(predictions, references)
    xs = [_parse_float(p, UNPARSEABLE_FLOAT) for p in predictions]
    ys = []
    for i, refs in enumerate(references):
        y = _parse_float(refs[0], math.nan)
        if math.isnan(y):
            raise UsageError(f"Pearson-Correlation: reference {refs[0]!r} of example {i} is not a finite number")
        ys.append(y)
    # Exact test: with all values equal the centred sums can be rounding noise rather than 0.
    if len(set(xs)) == 1 or len(set(ys)) == 1:
        return 0.0
    mean_x, mean_y = math.fsum(xs) / len(xs), math.fsum(ys) / len(ys)
    dx, dy = [x - mean_x for x in xs], [y - mean_y for y in ys]
    covariance = math.fsum(a * b for a, b in zip(dx, dy, strict=True))
    return _clip(covariance / math.sqrt(math.fsum(a * a for a in dx) * math.fsum(b * b for b in dy)))


METRIC_FUNCTIONS: dict[str, Callable[[Sequence[str], Sequence[Sequence[str]]], float]] = {  # keys: METRICS, in order
    "EM": exact_match,
    "ACC": accuracy,
    "Classification-F1": classification_f1,
    "QA-F1": qa_f1,
    "Rouge-L": rouge_l,
    "Matthew-Correlation": matthew_correlation,
    "Pearson-Correlation": pearson_correlation,
    "Strict-EM": strict_exact_match,
}


def score(metric: str, predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """The value of the metric named `metric` (one of `METRICS`) on a task's predictions."""
    if metric not in METRIC_FUNCTIONS:
        raise UsageError(f"unknown metric {metric!r}; allowed: {', '.join(map(repr, METRICS))}")
    return METRIC_FUNCTIONS[metric](predictions, references)


def average_relative_gain(
    method: Mapping[str, float], baseline: Mapping[str, float], *, zero_baseline: bool = False
) -> float:
    """ARG of a method over a baseline: mean over tasks of (method − baseline) / baseline, as a fraction (0.05 = 5%;
    ×100 for the papers' %).

    Both mappings go from task name to score and must hold the same tasks. As the task-level MoE paper's released
    code computes it (INK-USC/CrossTaskMoE example_scripts/compute_arg.py: per-task mean test scores of two
    methods, `rg = diff / baseline`, `np.mean(rg)`), except that there an inner join silently drops tasks either
    side lacks. (CrossFit's own repository ships no ARG code.)

    zero_baseline: a baseline score of 0 is an error (False), or, as in the released code (True), not special-cased:
    its task's gain is ±inf (NaN for 0/0), and so is the ARG.
    """
    only_method, only_baseline = sorted(method.keys() - baseline.keys()), sorted(baseline.keys() - method.keys())
    if only_method or only_baseline:
        raise UsageError(
            f"ARG needs the same tasks on both sides; only in method: {only_method}, only in baseline: {only_baseline}"
        )
    if not method:
        raise UsageError("ARG needs at least one task")
    zero = sorted(task for task, b in baseline.items() if b == 0)
    if zero and not zero_baseline:
        raise UsageError(f"ARG is undefined for tasks whose baseline score is 0: {zero}")
    gains = [_relative_gain(method[task], baseline[task]) for task in sorted(baseline)]
    if all(math.isfinite(gain) for gain in gains):
        return _mean(gains)
    return sum(gains) / len(gains)  # inf + -inf is NaN here; math.fsum would raise


def _relative_gain(score: float, base: float) -> float:
    """(score − base) / base, with a zero base as IEEE division gives it (±inf, NaN for 0/0)."""
    diff = score - base
    if base != 0:
        return diff / base
    return math.nan if diff == 0 else math.copysign(math.inf, diff) * math.copysign(1.0, base)


def _check_inputs(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    """Raise `ValueError` unless there is one non-empty reference list per prediction and at least one example."""
    if len(predictions) != len(references):
        raise UsageError(f"got {len(predictions)} predictions but {len(references)} reference lists")
    if not predictions:
        raise UsageError("got no predictions; a metric needs at least one example")
    for i, refs in enumerate(references):
        # A bare string is a Sequence[str] too: its characters would silently become references.
        if isinstance(refs, str):
            raise UsageError(f"references of example {i} is the string {refs!r}; expected a list of reference strings")
        if len(refs) == 0:
            raise UsageError(f"example {i} has no reference")


def _best_over_references(
    pair_score: Callable[[str, str], float], predictions: Sequence[str], references: Sequence[Sequence[str]]
) -> float:
    """Mean over examples of the max over an example's references of `pair_score(prediction, reference)`."""
    _check_inputs(predictions, references)
    return _mean(max(pair_score(p, r) for r in refs) for p, refs in zip(predictions, references, strict=True))


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return math.fsum(values) / len(values)


def _clip(r: float) -> float:
    """Rounding can push a correlation a hair past ±1."""
    return max(-1.0, min(1.0, r))


def _parse_float(text: str, default: float) -> float:
    """float(text), or `default` when it does not parse or is not finite ("nan" and "inf" parse)."""
    try:
        value = float(text)
    except ValueError:
        return default
    return value if math.isfinite(value) else default


def _token_f1(prediction: list[str], reference: list[str]) -> float:
    """F1 of the multiset overlap of two token lists."""
    same = sum((Counter(prediction) & Counter(reference)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(prediction), same / len(reference)
    return 2 * precision * recall / (precision + recall)


def _rouge_l_pair(prediction: str, reference: str) -> float:
    """Rouge-L of one prediction against one reference (see `rouge_l`)."""
    if all(ch in _PUNCTUATION for ch in prediction):
        return 0.0
    predicted, referenced = _rouge_sentences(prediction), _rouge_sentences(reference)
    if not referenced:
        return 0.0
    # `predicted` is not empty: a character outside string.punctuation is not "." and so lies in a sentence.
    overlap = {word for ref in referenced for pred in predicted for word in _lcs_words(ref, pred)}
    precision = len(overlap) / len(set(chain.from_iterable(predicted)))
    recall = len(overlap) / len(set(chain.from_iterable(referenced)))
    return 2 * (precision * recall / (precision + recall + ROUGE_F_EPSILON))  # the package's order of operations


def _rouge_sentences(text: str) -> list[list[str]]:
    """The words of each sentence: split at ".", drop empty pieces, collapse white space, split at spaces."""
    return [" ".join(piece.split()).split(" ") for piece in text.split(".") if piece]


def _lcs_words(reference: Sequence[str], prediction: Sequence[str]) -> list[str]:
    """The words of the longest common subsequence that the `rouge` package's back-tracking finds, last first.

    Which of several LCSs is found matters, as Rouge-L counts distinct words: walking back from the
    ends, a match is taken; otherwise the walk steps back in the reference only when that keeps a
    strictly longer LCS, else in the prediction. Cost: O(len(reference) · len(prediction)).
    """
    # lengths[i][j]: LCS length of reference[:i] and prediction[:j]
    lengths = [[0] * (len(prediction) + 1) for _ in range(len(reference) + 1)]
    for i, r in enumerate(reference, start=1):
        for j, p in enumerate(prediction, start=1):
            lengths[i][j] = lengths[i - 1][j - 1] + 1 if r == p else max(lengths[i - 1][j], lengths[i][j - 1])
    words, i, j = [], len(reference), len(prediction)
    while i and j:
        if reference[i - 1] == prediction[j - 1]:
            words.append(reference[i - 1])
            i, j = i - 1, j - 1
        elif lengths[i - 1][j] > lengths[i][j - 1]:
            i -= 1
        else:
            j -= 1
    return words
