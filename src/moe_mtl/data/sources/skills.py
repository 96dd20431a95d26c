"""The built-in skill suite: generated tasks that share latent skills, the offline default (DESIGN §5).

Each task applies a chain of primitive skills to a short sequence of digits or words, e.g. the task
"evens-sum" reads `evens | sum: 3 8 1 4` and answers `2` ((8 + 4) mod 10). Skills come in five
families (order, filter, map, aggregate, predicate); a task composes 1–3 of them, so tasks share
skills and the routing analysis has a known ground truth: every task's features name its skills,
their families and its output type. Held-out tasks (partitions "dev" and "test") are new
compositions of skills that seen tasks use, with k-shot train/dev splits per seed plus a test
split, as in CrossFit. docs/data.md lists the tasks.
"""

from __future__ import annotations

import functools
import json
import random
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from ...errors import UsageError
from ..tasks import DataError, Example, Task, options_from_dict

WORDS = ("apple", "egg", "ice", "owl", "umbrella", "arm", "cat", "dog", "sun", "pen", "box", "hat")
GLYPHS = ("α", "β", "γ", "δ", "ε", "ζ", "η", "θ")  # the unrelated family's alphabet: no digit, no Latin letter
VOWELS = "aeiou"
LABELS = {True: "yes", False: "no"}
OUTPUT_OF_FAMILY = {"aggregate": "number", "predicate": "label"}  # the other families keep a sequence
METRIC_OF_OUTPUT = {"sequence": "EM", "number": "ACC", "label": "Classification-F1"}
MAX_TRIES = 1000  # draws per example before the input space counts as exhausted


@dataclass(frozen=True)
class Skill:
    """A primitive: a pure function of the item list, the family it belongs to, and how prefixes name it."""

    name: str
    family: str
    prompt: str
    apply: Callable[[list], Any]
    domains: tuple[str, ...] = ("digits", "words")


SKILLS = {
    skill.name: skill
    for skill in (
        Skill("reverse", "order", "reverse", lambda xs: xs[::-1]),
        Skill("sort", "order", "sort", sorted),
        Skill("rotate", "order", "rotate", lambda xs: xs[1:] + xs[:1]),
        Skill("evens", "filter", "evens", lambda xs: [x for x in xs if x % 2 == 0], ("digits",)),
        Skill("odds", "filter", "odds", lambda xs: [x for x in xs if x % 2 == 1], ("digits",)),
        Skill("above_4", "filter", "above 4", lambda xs: [x for x in xs if x > 4], ("digits",)),
        Skill("vowels", "filter", "vowels", lambda xs: [w for w in xs if w[0].lower() in VOWELS], ("words",)),
        Skill("increment", "map", "increment", lambda xs: [(x + 1) % 10 for x in xs], ("digits",)),
        Skill("double", "map", "double", lambda xs: [2 * x % 10 for x in xs], ("digits",)),
        Skill("upper", "map", "upper", lambda xs: [w.upper() for w in xs], ("words",)),
        Skill("count", "aggregate", "count", len),
        Skill("sum", "aggregate", "sum", lambda xs: sum(xs) % 10, ("digits",)),
        Skill("max", "aggregate", "max", max, ("digits",)),
        Skill("min", "aggregate", "min", min, ("digits",)),
        Skill("first", "aggregate", "first", lambda xs: xs[0], ("digits",)),
        Skill("last", "aggregate", "last", lambda xs: xs[-1], ("digits",)),
        Skill("is_sorted", "predicate", "is sorted", lambda xs: xs == sorted(xs)),
        Skill("has_duplicates", "predicate", "has duplicates", lambda xs: len(set(xs)) < len(xs)),
        Skill("contains_7", "predicate", "contains 7", lambda xs: 7 in xs, ("digits",)),
        # the unrelated family (option `unrelated`): other operations on another alphabet, so that by construction
        # its tasks share no skill, family, domain or prompt word with the tasks above (Gupta et al.'s unrelated tasks)
        Skill(
            "pairswap",
            "permute",
            "swap pairs",
            lambda xs: [x for i in range(0, len(xs), 2) for x in xs[i : i + 2][::-1]],
            ("glyphs",),
        ),
        Skill("halves", "permute", "swap halves", lambda xs: xs[len(xs) // 2 :] + xs[: len(xs) // 2], ("glyphs",)),
        Skill("stutter", "rewrite", "stutter", lambda xs: [x for x in xs for _ in range(2)], ("glyphs",)),
        Skill("dedupe", "rewrite", "dedupe", lambda xs: list(dict.fromkeys(xs)), ("glyphs",)),
    )
}
FAMILIES = tuple(dict.fromkeys(skill.family for skill in SKILLS.values()))
UNRELATED_FAMILIES = ("permute", "rewrite")


@dataclass(frozen=True)
class SkillTask:
    """One task of the suite: a chain of skills applied left to right to one input domain."""

    skills: tuple[str, ...]
    domain: str = "digits"
    partition: str = "train"

    def __post_init__(self) -> None:
        misfits = [name for name in self.skills if self.domain not in SKILLS[name].domains]
        if misfits:
            raise UsageError(f"skill task {self.name!r}: skills {misfits} do not apply to {self.domain}")

    @property
    def name(self) -> str:
        return "-".join(self.skills)

    @property
    def prefix(self) -> str:
        return " | ".join(SKILLS[name].prompt for name in self.skills)

    @property
    def output_type(self) -> str:
        return OUTPUT_OF_FAMILY.get(SKILLS[self.skills[-1]].family, "sequence")

    @property
    def features(self) -> dict[str, Any]:
        return {
            "skills": list(self.skills),
            "families": sorted({SKILLS[name].family for name in self.skills}),
            "output_type": self.output_type,
            "domain": self.domain,
            "num_skills": len(self.skills),
        }


def _suite(partition: str, domain: str, *names: str) -> tuple[SkillTask, ...]:
    return tuple(SkillTask(tuple(name.split("-")), domain, partition) for name in names)


SUITE = (
    # Seen tasks: every skill alone (where it makes sense on its own), then compositions.
    *_suite("train", "digits", "reverse", "sort", "rotate", "evens", "above_4", "increment", "double"),
    *_suite("train", "digits", "count", "sum", "max", "min", "is_sorted", "has_duplicates", "contains_7"),
    *_suite("train", "digits", "odds-count", "evens-sum", "reverse-first", "double-last", "increment-max"),
    *_suite("train", "digits", "double-sum", "above_4-min", "rotate-first", "reverse-increment", "sort-double"),
    *_suite("train", "digits", "reverse-is_sorted", "odds-contains_7", "evens-has_duplicates"),
    *_suite("train", "digits", "evens-increment-sum", "above_4-double-sort"),
    *_suite("train", "words", "upper", "vowels", "upper-reverse", "vowels-count", "vowels-is_sorted"),
    # Held-out tasks: new compositions of the skills above, each computing a function no other task
    # computes (sort-first would be min, rotate-sum would be sum: unseen only in name).
    *_suite("dev", "digits", "evens-max", "rotate-is_sorted", "odds-has_duplicates"),
    *_suite("dev", "words", "upper-sort"),
    *_suite("test", "digits", "odds-sum", "evens-count", "sort-rotate", "reverse-last", "increment-first"),
    *_suite("test", "digits", "double-max"),
    *_suite("test", "digits", "above_4-reverse", "double-has_duplicates", "increment-contains_7"),
    *_suite("test", "words", "vowels-upper"),
)
# seen tasks added by the option `unrelated` (after the suite's, so the other tasks keep their ids and examples)
UNRELATED = _suite("train", "glyphs", "pairswap", "halves", "stutter", "dedupe", "pairswap-stutter", "dedupe-halves")


@dataclass
class SkillSuiteOptions:
    """Sizes and seeds of the generated skill suite (the `skills` option of the data module)."""

    seed: int = 0
    """Seed of the generated examples: the same seed gives the same suite."""
    train_size: int = 1000
    """Train examples per seen task."""
    dev_size: int = 100
    """Dev examples per seen task."""
    test_size: int = 200
    """Test examples per task (seen and held-out)."""
    shots: int = 32
    """Examples in each k-shot train and dev split of a held-out task (label tasks: half per label)."""
    fewshot_seeds: list[int] = field(default_factory=lambda: [100, 13, 21, 42, 87])
    """Seeds of the k-shot splits of held-out tasks (CrossFit's)."""
    min_items: int = 3
    """Fewest items in an input sequence."""
    max_items: int = 6
    """Most items in an input sequence."""
    train_sizes: dict[str, int] = field(default_factory=dict)
    """Train examples of named seen tasks instead of `train_size`, e.g. {"evens-sum": 32}: low-resource tasks."""
    unrelated: bool = False
    """Add the unrelated family: seen tasks on Greek letters whose skills (permute, rewrite) no other task uses."""

    def __post_init__(self) -> None:
        sizes = ("train_size", "dev_size", "test_size", "shots", "min_items")
        bad = [name for name in sizes if not isinstance(getattr(self, name), int) or getattr(self, name) < 1]
        if bad or self.max_items < self.min_items:
            raise DataError(
                f"skills options {bad or ['max_items']} are invalid: sizes must be positive integers "
                f"and max_items >= min_items (got {self})"
            )
        if not isinstance(self.unrelated, bool):
            raise DataError(f"skills option `unrelated` is {self.unrelated!r}; it must be true or false")
        seen = [spec.name for spec in suite_specs(self.unrelated) if spec.partition == "train"]
        for name, size in dict(self.train_sizes).items():
            if name not in seen:
                raise DataError(
                    f"skills option `train_sizes` names {name!r}, which is not a seen task of the suite"
                    f"{'' if self.unrelated else ' (without `unrelated`)'}; seen tasks: {', '.join(seen)}"
                )
            if isinstance(size, bool) or not isinstance(size, int) or size < 1:
                raise DataError(f"skills option `train_sizes`: {name!r} is {size!r}; it must be a positive integer")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> SkillSuiteOptions:
        """Build from the `skills` option, naming unknown keys."""
        return options_from_dict(cls, values, "skills")


def suite_specs(unrelated: bool = False) -> tuple[SkillTask, ...]:
    """The suite's tasks, and the unrelated family's after them with `unrelated`."""
    return SUITE + UNRELATED if unrelated else SUITE


def solve(task: SkillTask, items: list) -> Any:
    """The task's answer for `items`, or None when a filter leaves nothing to work on."""
    value = items
    for name in task.skills:
        if not value:
            return None
        value = SKILLS[name].apply(value)
    return value if value != [] else None


def _render(value: Any) -> str:
    if isinstance(value, bool):
        return LABELS[value]
    if isinstance(value, list):
        return " ".join(map(str, value))
    return str(value)


def _draw(task: SkillTask, rng: random.Random, options: SkillSuiteOptions) -> list:
    population = {"digits": range(10), "words": WORDS, "glyphs": GLYPHS}[task.domain]
    items = rng.choices(population, k=rng.randint(options.min_items, options.max_items))
    if task.output_type == "label":
        # ordered proposals make both answers of order predicates reachable
        order = rng.randrange(3)
        if order:
            items.sort(reverse=order == 2)
    return items


def _examples(task: SkillTask, size: int, rng: random.Random, options: SkillSuiteOptions, taken: set[str]) -> list:
    """`size` examples whose inputs are not in `taken` (which then holds them too); labels alternate yes/no."""
    examples = []
    while len(examples) < size:
        wanted = len(examples) % 2 == 0 if task.output_type == "label" else None
        for _ in range(MAX_TRIES):
            items = _draw(task, rng, options)
            answer = solve(task, items)
            text = f"{task.prefix}: {_render(items)}"
            if answer is not None and (wanted is None or answer == wanted) and text not in taken:
                break
        else:
            raise DataError(
                f"skill task {task.name!r}: found no new input in {MAX_TRIES} draws; the sizes are too large for "
                f"sequences of {options.min_items}–{options.max_items} items: lower them or raise `max_items`"
            )
        taken.add(text)
        examples.append(Example(text, (_render(answer),)))
    return examples


def skill_tasks(options: SkillSuiteOptions | Mapping[str, Any] | None = None) -> list[Task]:
    """Generate the suite: seen tasks with train/dev/test, held-out tasks with k-shot splits per seed and test.

    The splits of one task never share an input. Deterministic for `options.seed`. Each call returns new Task
    objects (their lists are the caller's to change); the examples, immutable, are generated once per process
    and options: a few-shot grid builds the data module once per cell, and generating took ~1.5 s of each.
    """
    if not isinstance(options, SkillSuiteOptions):
        options = SkillSuiteOptions.from_dict(options)
    tasks = []
    specs = suite_specs(options.unrelated)
    for spec, (splits, fewshot) in zip(specs, _suite_examples(json.dumps(asdict(options))), strict=True):
        tasks.append(
            Task(
                spec.name,
                {split: list(examples) for split, examples in splits.items()},
                metric=METRIC_OF_OUTPUT[spec.output_type],
                features=spec.features,
                partition=spec.partition,
                fewshot={seed: {split: list(shot) for split, shot in shots.items()} for seed, shots in fewshot.items()},
                origin=f"skill suite task {spec.name!r}",
            )
        )
    return tasks


Splits = dict[str, tuple[Example, ...]]


@functools.lru_cache(maxsize=4)
def _suite_examples(options_json: str) -> tuple[tuple[Splits, dict[int, Splits]], ...]:
    """Per task of SUITE, its splits and k-shot splits per seed, for the options (as JSON, a cache key)."""
    options = SkillSuiteOptions(**json.loads(options_json))
    generated = []
    for spec in suite_specs(options.unrelated):

        def rng(*parts, name=spec.name) -> random.Random:
            return random.Random("/".join(map(str, (options.seed, name, *parts))))

        taken: set[str] = set()
        splits = {"test": tuple(_examples(spec, options.test_size, rng("test"), options, taken))}
        fewshot = {}
        if spec.partition == "train":
            splits["dev"] = tuple(_examples(spec, options.dev_size, rng("dev"), options, taken))
            size = options.train_sizes.get(spec.name, options.train_size)
            splits["train"] = tuple(_examples(spec, size, rng("train"), options, taken))
        else:
            for seed in options.fewshot_seeds:
                shot_taken = set(taken)
                fewshot[seed] = {
                    split: tuple(_examples(spec, options.shots, rng(split, seed), options, shot_taken))
                    for split in ("train", "dev")
                }
        generated.append((splits, fewshot))
    return tuple(generated)
