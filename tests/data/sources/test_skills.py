import random
from collections import Counter

import numpy as np
import pytest

from moe_mtl.data.sources.skills import (
    FAMILIES,
    GLYPHS,
    SKILLS,
    SUITE,
    UNRELATED,
    UNRELATED_FAMILIES,
    WORDS,
    SkillSuiteOptions,
    SkillTask,
    _suite_examples,
    skill_tasks,
    solve,
)
from moe_mtl.data.tasks import DataError, feature_table


@pytest.fixture(scope="module")
def suite():
    return skill_tasks()


def items_of(example):
    """The input items after the task prefix."""
    return example.input.split(": ", 1)[1].split()


def test_suite_shape():
    seen = [t for t in SUITE if t.partition == "train"]
    held_out = [t for t in SUITE if t.partition != "train"]
    used = {name for t in SUITE for name in t.skills}
    assert len(used) >= 8 and len({SKILLS[name].family for name in used}) >= 3
    assert set(FAMILIES) == {"order", "filter", "map", "aggregate", "predicate", *UNRELATED_FAMILIES}
    assert not {SKILLS[name].family for name in used} & set(UNRELATED_FAMILIES)  # only with `unrelated`
    assert len(seen) >= 24 and len(held_out) >= 8
    assert all(1 <= len(t.skills) <= 3 for t in SUITE)
    assert len({t.name for t in SUITE}) == len(SUITE)


def test_held_out_tasks_are_new_compositions_of_seen_skills():
    seen = [t for t in SUITE if t.partition == "train"]
    seen_skills = {name for t in seen for name in t.skills}
    for t in SUITE:
        if t.partition != "train":
            assert set(t.skills) <= seen_skills, t.name
            assert t.skills not in {s.skills for s in seen}


def test_every_output_type_and_its_metric(suite):
    assert {(t.features["output_type"], t.metric) for t in suite} == {
        ("sequence", "EM"),
        ("number", "ACC"),
        ("label", "Classification-F1"),
    }


def test_deterministic_for_a_seed(small_skills):
    assert skill_tasks(small_skills) == skill_tasks(small_skills)
    other = skill_tasks({**small_skills, "seed": 1})
    assert [t.splits["test"] for t in other] != [t.splits["test"] for t in skill_tasks(small_skills)]


def test_each_call_gives_tasks_of_its_own_with_the_examples_of_a_fresh_generation(small_skills):
    changed = skill_tasks(small_skills)  # generated once per process and options: its lists are the caller's
    changed[0].splits["train"].clear()
    held_out = next(t for t in changed if t.partition != "train")
    held_out.fewshot[13]["train"].pop()
    _suite_examples.cache_clear()
    fresh = skill_tasks(small_skills)
    assert skill_tasks(small_skills) == fresh != changed
    assert len(fresh[0].splits["train"]) == small_skills["train_size"]


def test_sizes_and_fewshot_splits(small_skills):
    tasks = skill_tasks(small_skills)
    for t in tasks:
        if t.partition == "train":
            assert {k: len(v) for k, v in t.splits.items()} == {"train": 16, "dev": 4, "test": 6}
            assert t.fewshot == {}
        else:
            assert list(t.splits) == ["test"] and len(t.splits["test"]) == 6
            assert sorted(t.fewshot) == [13, 42]
            assert all(len(t.fewshot[s][split]) == 4 for s in (13, 42) for split in ("train", "dev"))


def test_splits_of_a_task_share_no_input(suite):
    for t in suite:
        groups = [t.splits.get(s, []) for s in ("train", "dev")] + [v for f in t.fewshot.values() for v in f.values()]
        test_inputs = {e.input for e in t.splits["test"]}
        assert all(not test_inputs & {e.input for e in g} for g in groups), t.name


def test_inputs_carry_the_task_prefix(suite):
    prefixes = {t.name: " | ".join(SKILLS[s].prompt for s in t.features["skills"]) for t in suite}
    assert prefixes["evens-sum"] == "evens | sum"
    for t in suite:
        assert all(e.input.startswith(prefixes[t.name] + ": ") for e in t.splits["test"])
    assert len(set(prefixes.values())) == len(suite)


@pytest.mark.parametrize(
    ("name", "answer"),
    [
        ("sort", lambda xs: " ".join(map(str, sorted(map(int, xs))))),
        ("reverse-increment", lambda xs: " ".join(str((int(x) + 1) % 10) for x in reversed(xs))),
        ("evens-sum", lambda xs: str(sum(int(x) for x in xs if int(x) % 2 == 0) % 10)),
        ("above_4-double-sort", lambda xs: " ".join(map(str, sorted(2 * int(x) % 10 for x in xs if int(x) > 4)))),
        ("reverse-is_sorted", lambda xs: "yes" if list(map(int, xs)) == sorted(map(int, xs), reverse=True) else "no"),
        ("vowels-count", lambda xs: str(sum(w[0] in "aeiou" for w in xs))),
        ("vowels-upper", lambda xs: " ".join(w.upper() for w in xs if w[0] in "aeiou")),
    ],
)
def test_answers(suite, name, answer):
    t = next(t for t in suite if t.name == name)
    for example in t.splits["test"]:
        assert example.targets == (answer(items_of(example)),), example.input


def test_label_tasks_are_balanced(suite):
    for t in suite:
        if t.features["output_type"] == "label":
            assert Counter(e.targets[0] for e in t.splits["test"]) == {"yes": 100, "no": 100}, t.name


def test_item_counts_follow_options():
    tasks = skill_tasks({"train_size": 20, "dev_size": 2, "test_size": 20, "min_items": 4, "max_items": 4})
    assert {len(items_of(e)) for t in tasks for e in t.splits["test"]} == {4}


def test_feature_table_gives_skills_families_and_output_type(suite):
    columns, table = feature_table(suite)
    rows = {t.name: dict(zip(columns, row, strict=True)) for t, row in zip(suite, table, strict=True)}
    assert rows["evens-sum"]["skills=evens"] == 1 and rows["evens-sum"]["skills=sum"] == 1
    assert rows["evens-sum"]["families=filter"] == 1 and rows["evens-sum"]["families=order"] == 0
    assert rows["evens-sum"]["output_type=number"] == 1 and rows["evens-sum"]["domain=digits"] == 1
    skill_columns = [i for i, c in enumerate(columns) if c.startswith("skills=")]
    np.testing.assert_array_equal(table[:, skill_columns].sum(1), table[:, columns.index("num_skills")])
    assert len(skill_columns) == len({name for spec in SUITE for name in spec.skills})


def test_bad_options():
    with pytest.raises(DataError, match=r"unknown `skills` options \['size'\]"):
        SkillSuiteOptions.from_dict({"size": 3})
    with pytest.raises(DataError, match="max_items"):
        SkillSuiteOptions(min_items=5, max_items=3)
    with pytest.raises(DataError, match="found no new input"):
        skill_tasks({"test_size": 200, "min_items": 1, "max_items": 1})


def test_a_task_applies_only_skills_of_its_domain():
    with pytest.raises(ValueError, match=r"skills \['upper'\] do not apply to digits"):
        SkillTask(("sort", "upper"), "digits")


def test_every_task_computes_a_function_of_its_own():
    # a held-out task equal to a seen one under another name (sort-first = min) would inflate unseen scores
    rng = random.Random(5)
    probes = {
        domain: [
            sorted(items) if i % 2 else items
            for i, items in enumerate(rng.choices(pool, k=rng.randint(3, 6)) for _ in range(2000))
        ]
        for domain, pool in (("digits", range(10)), ("words", WORDS))
    }
    functions = {}
    for spec in SUITE:
        signature = (spec.domain, tuple(repr(solve(spec, list(items))) for items in probes[spec.domain]))
        assert signature not in functions, f"{spec.name} computes the same function as {functions[signature]}"
        functions[signature] = spec.name


# --- options for the second paper's studies: low-resource tasks and an unrelated family ----------------


def test_train_sizes_make_named_tasks_low_resource_and_leave_the_rest_as_they_were():
    sizes = {"train_size": 40, "dev_size": 4, "test_size": 8}
    base = {t.name: t for t in skill_tasks(sizes)}
    low = {t.name: t for t in skill_tasks({**sizes, "train_sizes": {"evens-sum": 16, "upper": 3}})}
    assert len(low["evens-sum"].splits["train"]) == 16 and len(low["upper"].splits["train"]) == 3
    # the same draws, fewer of them: a prefix of the full split; dev, test and every other task unchanged
    assert low["evens-sum"].splits["train"] == base["evens-sum"].splits["train"][:16]
    assert low["evens-sum"].splits["dev"] == base["evens-sum"].splits["dev"]
    assert all(low[name].splits == task.splits for name, task in base.items() if name not in ("evens-sum", "upper"))


def test_the_unrelated_family_shares_no_skill_family_domain_or_prompt_word_with_the_suite():
    sizes = {"train_size": 20, "dev_size": 4, "test_size": 8}
    base, tasks = skill_tasks(sizes), skill_tasks({**sizes, "unrelated": True})
    assert [t.name for t in tasks] == [t.name for t in base] + [spec.name for spec in UNRELATED]
    assert all(a.splits == b.splits for a, b in zip(base, tasks, strict=False))  # the suite's tasks unchanged
    family = tasks[len(base) :]
    assert {t.partition for t in family} == {"train"} and {t.metric for t in family} == {"EM"}

    def every(key, group):
        return {
            value for t in group for value in (t.features[key] if key in ("skills", "families") else [t.features[key]])
        }

    for key in ("skills", "families", "domain"):
        assert not every(key, family) & every(key, base), key
    assert every("families", family) == set(UNRELATED_FAMILIES)
    prompt = {word for t in family for word in t.splits["test"][0].input.split(": ")[0].split()}
    assert not prompt & {word for t in base for word in t.splits["test"][0].input.split(": ")[0].split()} - {"|"}
    alphabet = {item for t in family for e in t.splits["test"] for item in items_of(e)}
    assert alphabet <= set(GLYPHS) and not alphabet & {c for t in base for e in t.splits["test"] for c in e.input}


@pytest.mark.parametrize(
    ("name", "answer"),
    [
        ("pairswap", lambda xs: [x for i in range(0, len(xs), 2) for x in reversed(xs[i : i + 2])]),
        ("halves", lambda xs: xs[len(xs) // 2 :] + xs[: len(xs) // 2]),
        ("stutter", lambda xs: [x for x in xs for _ in "ab"]),
        ("dedupe-halves", lambda xs: (lambda d: d[len(d) // 2 :] + d[: len(d) // 2])(list(dict.fromkeys(xs)))),
    ],
)
def test_unrelated_answers(name, answer):
    task = next(t for t in skill_tasks({"unrelated": True, "test_size": 30, "dev_size": 2}) if t.name == name)
    for example in task.splits["test"]:
        assert example.targets == (" ".join(answer(items_of(example))),), example.input


def test_bad_study_options_name_the_task_or_value():
    with pytest.raises(
        DataError, match=r"`train_sizes` names 'pairswap', which is not a seen task .*without `unrelated`"
    ):
        SkillSuiteOptions(train_sizes={"pairswap": 8})
    with pytest.raises(DataError, match=r"`train_sizes` names 'odds-sum', which is not a seen task"):
        SkillSuiteOptions(train_sizes={"odds-sum": 8})  # a held-out task has k-shot splits, not a train split
    with pytest.raises(DataError, match=r"`train_sizes`: 'sort' is 0; it must be a positive integer"):
        SkillSuiteOptions(train_sizes={"sort": 0})
    with pytest.raises(DataError, match="`unrelated` is 'yes'"):
        SkillSuiteOptions(unrelated="yes")
    assert SkillSuiteOptions(unrelated=True, train_sizes={"pairswap": 8}).train_sizes == {"pairswap": 8}
