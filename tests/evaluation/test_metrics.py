import json
import math
import random
import statistics
import string
from pathlib import Path

import pytest

from moe_mtl.data.tasks import METRICS
from moe_mtl.evaluation.metrics import (
    METRIC_FUNCTIONS,
    accuracy,
    average_relative_gain,
    classification_f1,
    exact_match,
    matthew_correlation,
    normalize_answer,
    pearson_correlation,
    qa_f1,
    rouge_l,
    score,
    strict_exact_match,
)

CROSSFIT_CASES = Path(__file__).parent / "data" / "crossfit_metric_cases.json"
"""Values CrossFit's own `dataloader/metrics.py` returned (`crossfit`; null where it raised or gave NaN).
Where the copy came from: data/README.md."""


def crossfit_cases(scored: bool) -> list:
    """The cases CrossFit scored (`scored`) or failed on, one pytest param each, named metric-case."""
    cases = json.loads(CROSSFIT_CASES.read_text(encoding="utf-8"))
    return [
        pytest.param(case, id=f"{case['metric']}-{case['name']}")
        for case in cases
        if (case["crossfit"] is not None) == scored
    ]


@pytest.mark.parametrize("case", crossfit_cases(scored=True))
def test_metric_equals_crossfit(case):
    assert score(case["metric"], case["predictions"], case["references"]) == pytest.approx(case["crossfit"], abs=1e-6)


@pytest.mark.parametrize("case", crossfit_cases(scored=False))
def test_metric_where_crossfit_fails(case):
    """CrossFit raises on an empty Rouge-L reference and gives NaN for some Pearson inputs; our documented values."""
    predictions, references = case["predictions"], case["references"]
    if case["metric"] == "Rouge-L":
        assert case["crossfit_error"] == "ValueError: Reference is empty."
        # an empty reference scores 0: the same as leaving it out, and 0 for an example with no other
        kept = [[r for r in refs if r.strip(".")] for refs in references]
        expected = math.fsum(rouge_l([p], [refs]) for p, refs in zip(predictions, kept, strict=True) if refs)
        assert rouge_l(predictions, references) == pytest.approx(expected / len(predictions), abs=1e-12)
    else:
        assert case["metric"] == "Pearson-Correlation" and case["crossfit_error"] is None  # NaN
        xs = [float(p) if _is_finite_float(p) else 3.0 for p in predictions]
        ys = [float(refs[0]) for refs in references]
        try:
            expected = statistics.correlation(xs, ys)
        except statistics.StatisticsError:  # a constant side
            expected = 0.0
        assert pearson_correlation(predictions, references) == pytest.approx(expected, abs=1e-12)


def _is_finite_float(text):
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The Cat!", "cat"),
        ("  A  quick,\tbrown  fox. ", "quick brown fox"),
        ("theater and anthem", "theater and anthem"),  # articles only as whole words
        ("THE", ""),
        ("an apple-pie", "applepie"),  # punctuation is deleted, not turned into space
        ("a.b", "ab"),  # punctuation goes before articles: "a.b" is one word, not the article "a"
        ("Don't", "dont"),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_exact_match_normalises_and_takes_the_best_reference():
    predictions = ["The cat.", "dog", "bird"]
    references = [["cat"], ["a hound", "Dog!"], ["fish"]]
    assert exact_match(predictions, references) == pytest.approx(2 / 3)  # 1, 1 (second reference), 0


def test_accuracy_only_lower_cases():
    predictions = ["Yes", "no ", "Maybe", "the cat"]
    references = [["yes"], ["no"], ["x", "MAYBE"], ["cat"]]
    # 1, 0 (trailing space), 1 (second reference), 0 (no article removal) → 2/4
    assert accuracy(predictions, references) == 0.5


@pytest.mark.parametrize(
    ("prediction", "reference", "strict", "em"),
    [
        ("] ) }", "] ) }", 1.0, 1.0),
        ("] )", "] ) }", 0.0, 1.0),  # EM removes all brackets: both become ""
        ("-5", "5", 0.0, 1.0),  # EM removes the minus sign
        ("(A)", "A", 0.0, 1.0),
        ("the answer", "answer", 0.0, 1.0),  # EM removes articles
        ("True", "true", 0.0, 1.0),  # EM lower-cases
        (" 42\n", "42", 1.0, 1.0),  # only surrounding white space is ignored
        ("4 2", "42", 0.0, 0.0),
        ("a  b", "a b", 0.0, 1.0),  # inner white space counts; EM collapses it
    ],
)
def test_strict_exact_match_keeps_what_em_normalises_away(prediction, reference, strict, em):
    assert strict_exact_match([prediction], [[reference]]) == strict
    assert exact_match([prediction], [[reference]]) == em


def test_strict_exact_match_takes_the_best_reference():
    assert strict_exact_match(["-5", "x"], [["5", "-5"], ["y"]]) == 0.5


@pytest.mark.parametrize(
    ("prediction", "refs", "expected"),
    [
        # normalised [big, red, dog] vs [red, dog, barks]: 2 shared, P = R = 2/3, F1 = 2/3;
        # vs [big, dog]: 2 shared, P = 2/3, R = 1, F1 = 2·(2/3)/(5/3) = 4/5; the max is 4/5
        ("The big red dog", ["red dog barks", "big dog"], 4 / 5),
        ("x x y", ["x y y"], 2 / 3),  # multiset overlap {x, y} = 2, not 3
        ("cat", ["dog"], 0.0),
        ("The", ["a"], 0.0),  # both empty after normalisation: 0, as SQuAD v1
        ("Paris!", ["paris"], 1.0),
    ],
)
def test_qa_f1(prediction, refs, expected):
    assert qa_f1([prediction], [refs]) == pytest.approx(expected)


def test_qa_f1_averages_over_examples():
    assert qa_f1(["The big red dog", "cat"], [["red dog barks", "big dog"], ["dog"]]) == pytest.approx(0.4)


def sklearn_style_macro_f1(gold, predicted):
    """Macro-F1 as sklearn computes it: per-label precision and recall (0 when undefined), union of labels."""
    scores = []
    for label in set(gold) | set(predicted):
        tp = sum(g == p == label for g, p in zip(gold, predicted, strict=True))
        fp = sum(p == label != g for g, p in zip(gold, predicted, strict=True))
        fn = sum(g == label != p for g, p in zip(gold, predicted, strict=True))
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        scores.append(2 * precision * recall / (precision + recall) if precision + recall else 0.0)
    return sum(scores) / len(scores)


@pytest.mark.parametrize(
    ("gold", "predicted", "expected"),
    [
        # pos: TP 2, 3 gold, 2 predicted → 4/5; neg: TP 1, 1 gold, 2 predicted → 2/3; mean 11/15
        # (accuracy is 3/4)
        (["pos", "pos", "pos", "neg"], ["pos", "pos", "neg", "neg"], 11 / 15),
        # a: 2/3, b: 1, c (predicted only): 0 → 5/9; over gold labels only it would be 5/6
        (["a", "a", "b"], ["a", "c", "b"], 5 / 9),
        (["a", "b"], ["a", "b"], 1.0),
        (["a", "a"], ["b", "b"], 0.0),
    ],
)
def test_classification_f1(gold, predicted, expected):
    references = [[g, "distractor"] for g in gold]  # only the first reference is the gold label
    assert classification_f1(predicted, references) == pytest.approx(expected)
    assert classification_f1(predicted, references) == pytest.approx(sklearn_style_macro_f1(gold, predicted))


def test_classification_f1_differs_from_accuracy():
    predicted, references = ["pos", "pos", "neg", "neg"], [["pos"], ["pos"], ["pos"], ["neg"]]
    assert accuracy(predicted, references) == 0.75
    assert classification_f1(predicted, references) == pytest.approx(11 / 15)


def test_classification_f1_ignores_later_references():
    # gold "a" never predicted, "b" predicted but not gold: both F1 0
    assert classification_f1(["b"], [["a", "b"]]) == 0.0


def lcs_by_recursion(a, b):
    """Brute-force LCS length, for tiny token lists."""
    if not a or not b:
        return 0
    if a[0] == b[0]:
        return 1 + lcs_by_recursion(a[1:], b[1:])
    return max(lcs_by_recursion(a[1:], b), lcs_by_recursion(a, b[1:]))


ALMOST_1 = 1 - 5e-9  # F = 2PR / (P + R + 1e-8) with P = R = 1, as the `rouge` package


@pytest.mark.parametrize(
    ("prediction", "refs", "expected"),
    [
        # LCS "the cat on mat": 4 distinct words of 5 and of 6, P = 4/5, R = 2/3, F = 8/11
        ("the cat sat on the mat", ["the cat was on a mat"], 8 / 11),
        # LCS "B D" = 2: P = 2/4, R = 2/3, F1 = 2·(1/2)(2/3)/(7/6) = 4/7; the second reference gives 0
        ("A B C D", ["B D E", "x"], 4 / 7),
        ("cat.", ["the", "cat"], ALMOST_1),  # "." ends a sentence; max over references
        ("Cat", ["cat"], 0.0),  # case counts
        ("cat!", ["cat"], 0.0),  # other punctuation stays on its word
        ("hello, world", ["hello world"], 1 / 2),
        ("one. two. three", ["one two three"], ALMOST_1),  # the LCS union over sentence pairs
        ("cat cat cat", ["cat"], ALMOST_1),  # distinct words: 1 of 1
        ("cat. ", ["cat"], 2 / 3),  # a white-space sentence is an empty word: P = 1/2, R = 1
        ("  spaced   out ", ["spaced out"], ALMOST_1),  # white space inside a sentence collapses
        ("b a", ["a b"], 1 / 2),  # order matters: LCS 1
        # which LCS the back-tracking finds: "a b a" against "a a b" finds "a b" (2 words), against
        # "a b a" the reverse finds "a a" (1 word); "b a. a" against "a b" finds "b" then "a"
        ("a b a", ["a a b"], ALMOST_1),
        ("a a b", ["a b a"], 1 / 2),
        ("b a. a", ["a b"], ALMOST_1),
        ("?!", ["?!"], 0.0),  # only punctuation: 0, CrossFit's rule
        ("", ["anything"], 0.0),
        ("cat", [""], 0.0),  # no sentence in the reference: CrossFit raises, we score 0
        ("cat", ["...", "cat"], ALMOST_1),  # and the other references still count
    ],
)
def test_rouge_l(prediction, refs, expected):
    assert rouge_l([prediction], [refs]) == pytest.approx(expected, rel=1e-7)


@pytest.mark.parametrize("seed", range(20))
def test_rouge_l_of_distinct_words_is_lcs_f1(seed):
    rng = random.Random(seed)
    prediction = rng.sample("abcdefg", k=rng.randint(1, 7))
    reference = rng.sample("abcdefg", k=rng.randint(1, 7))
    lcs = lcs_by_recursion(prediction, reference)
    # with distinct words, F1 = 2PR/(P+R) with P = lcs/|pred|, R = lcs/|ref| simplifies to 2·lcs/(|pred|+|ref|)
    expected = 2 * lcs / (len(prediction) + len(reference))
    assert rouge_l([" ".join(prediction)], [[" ".join(reference)]]) == pytest.approx(expected, rel=1e-7)


ACC, UNACC = "acceptable", "unacceptable"


@pytest.mark.parametrize(
    ("predicted", "gold", "expected"),
    [
        # TP 2, FN 1, FP 1, TN 1: (2·1 − 1·1) / √(3·3·2·2) = 1/6
        ([ACC, ACC, UNACC, ACC, UNACC], [ACC, ACC, ACC, UNACC, UNACC], 1 / 6),
        ([ACC, UNACC], [ACC, UNACC], 1.0),
        ([UNACC, ACC], [ACC, UNACC], -1.0),
        ([ACC, ACC], [ACC, UNACC], 0.0),  # constant predictions: denominator 0
        (["Acceptable", "junk"], [ACC, UNACC], 0.0),  # only "acceptable" is positive
        ([" acceptable", UNACC, "acceptable\n"], [ACC, UNACC, ACC], 1.0),  # up to surrounding white space
        ([ACC, UNACC], [ACC + " ", ACC], -1.0),  # the gold label compares exactly: "acceptable " is negative
    ],
)
def test_matthew_correlation(predicted, gold, expected):
    references = [[g, ACC] for g in gold]  # only the first reference counts
    assert matthew_correlation(predicted, references) == pytest.approx(expected)


def test_matthew_correlation_is_pearson_of_indicators():
    rng = random.Random(0)
    gold = rng.choices([ACC, UNACC], k=30)
    predicted = rng.choices([ACC, UNACC, "other", f" {ACC} "], k=30)
    indicators = [[float(x.strip() == ACC) for x in xs] for xs in (predicted, gold)]
    expected = statistics.correlation(*indicators)
    assert matthew_correlation(predicted, [[g] for g in gold]) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("predicted", "gold", "expected"),
    [
        # dx = (−1, 0, 1), dy = (−4/3, −1/3, 5/3): cov 3, Σdx² 2, Σdy² 14/3 → 3/√(28/3) = √(27/28)
        (["1", "2", "3"], ["1", "2", "4"], math.sqrt(27 / 28)),
        # unparseable and non-finite predictions become 3.0: x = (1, 3, 5, 3) against y = (1, 2, 3, 2) → 1
        (["1", "oops", "5", "nan"], ["1", "2", "3", "2"], 1.0),
        (["3", "2", "1"], ["1.0", "2.0", "3.0"], -1.0),
        (["2", "2", "2"], ["1", "2", "3"], 0.0),  # zero variance in predictions
        (["x", "y", "inf"], ["1", "2", "3"], 0.0),  # all become 3.0: zero variance
        (["1", "2", "3"], ["0.1", "0.1", "0.1"], 0.0),  # zero variance in references
    ],
)
def test_pearson_correlation(predicted, gold, expected):
    result = pearson_correlation(predicted, [[g, "9"] for g in gold])  # only the first reference counts
    assert not math.isnan(result)
    assert result == pytest.approx(expected)


def test_pearson_correlation_matches_statistics():
    rng = random.Random(1)
    xs = [rng.uniform(0, 5) for _ in range(25)]
    ys = [x + rng.gauss(0, 1) for x in xs]
    result = pearson_correlation([str(x) for x in xs], [[str(y)] for y in ys])
    assert result == pytest.approx(statistics.correlation(xs, ys))


def test_pearson_correlation_rejects_non_numeric_reference():
    with pytest.raises(ValueError, match=r"reference 'high' of example 1 is not a finite number"):
        pearson_correlation(["1", "2"], [["1"], ["high"]])


def test_metric_functions_cover_the_metric_names():
    assert tuple(METRIC_FUNCTIONS) == METRICS


@pytest.mark.parametrize("metric", METRICS)
def test_score_dispatches(metric):
    predictions, references = ["1", "2", "3"], [["1"], ["2"], ["4"]]
    assert score(metric, predictions, references) == METRIC_FUNCTIONS[metric](predictions, references)


@pytest.mark.parametrize("metric", METRICS)
def test_perfect_predictions_score_1(metric):
    predictions = ["1", "acceptable", "3", "unacceptable"] if metric == "Matthew-Correlation" else ["1", "2", "3"]
    assert score(metric, predictions, [[p] for p in predictions]) == pytest.approx(1.0)


def test_score_rejects_unknown_metric():
    with pytest.raises(ValueError, match=r"unknown metric 'BLEU'; allowed: 'EM', 'ACC', .*'Strict-EM'"):
        score("BLEU", ["a"], [["a"]])


@pytest.mark.parametrize("metric", METRICS)
def test_score_rejects_bad_inputs(metric):
    with pytest.raises(ValueError, match=r"got 2 predictions but 1 reference lists"):
        score(metric, ["1", "2"], [["1"]])
    with pytest.raises(ValueError, match=r"got no predictions"):
        score(metric, [], [])
    with pytest.raises(ValueError, match=r"references of example 1 is the string '2'; expected a list"):
        score(metric, ["1", "2"], [["1"], "2"])
    with pytest.raises(ValueError, match=r"example 0 has no reference"):
        score(metric, ["1"], [[]])


def test_average_relative_gain():
    # a: (0.6 − 0.5)/0.5 = 0.2; b: (0.3 − 0.4)/0.4 = −0.25; mean −0.025
    assert average_relative_gain({"a": 0.6, "b": 0.3}, {"b": 0.4, "a": 0.5}) == pytest.approx(-0.025)
    assert average_relative_gain({"a": 0.5}, {"a": 0.5}) == 0.0


def test_average_relative_gain_rejects_different_tasks():
    with pytest.raises(ValueError, match=r"only in method: \['c'\], only in baseline: \['b'\]"):
        average_relative_gain({"a": 1.0, "c": 1.0}, {"a": 1.0, "b": 1.0})


def test_average_relative_gain_rejects_zero_baseline():
    with pytest.raises(ValueError, match=r"baseline score is 0: \['b', 'c'\]"):
        average_relative_gain({"a": 1.0, "b": 1.0, "c": 0.5}, {"a": 1.0, "b": 0.0, "c": 0.0})


def test_average_relative_gain_rejects_no_tasks():
    with pytest.raises(ValueError, match=r"at least one task"):
        average_relative_gain({}, {})


def test_punctuation_set_is_string_punctuation():
    # CrossFit removes exactly string.punctuation; other symbols (e.g. "€") survive
    assert normalize_answer(string.punctuation + " € ") == "€"
