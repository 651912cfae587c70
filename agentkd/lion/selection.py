"""Which seeds the generator gets, through which prompt, and what each child is recorded as.

Lion (arXiv 2305.12870, loop.selection = "lion"): seeds judged hard go to the hard prompt (same kind and
difficulty), seeds judged easy to the easy prompt (rarer), hard_fraction of the draws hard. The
random-expansion baseline (loop.selection = "random"): seeds drawn uniformly from all of B(t), each
through the plain prompt (another of the same kind), with no referee label involved. Seeds are drawn
with replacement, one per request, in both.

A child's `source` says honestly which prompt made it from which seed:
  "hard", "easy"            that prompt, from a seed judged so
  "hard_prompt_easy_seed"   the hard prompt from an easy seed (no seed was judged hard)
  "easy_prompt_hard_seed"   the easy prompt from a hard seed (no seed was judged easy)
  "plain"                   the plain prompt from an unjudged seed (random selection)
so hard yield, which asks whether children of hard seeds stay hard, follows only "hard" children.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import NamedTuple

from agentkd.config import LoopSection
from agentkd.lion.pools import Item
from agentkd.roles.requests import GeneratorPrompt


class Draw(NamedTuple):
    number: int  # makes each draw's request distinct (the request's `sample`)
    seed: Item
    prompt: GeneratorPrompt
    source: str  # what the child is recorded as (see the module docstring)


def draw(rng: random.Random, seeds: Sequence[Item], n: int, prompt: GeneratorPrompt, source: str) -> list[Draw]:
    """n seeds drawn with replacement, numbered per prompt so every request is distinct."""
    if not seeds or n <= 0:
        return []
    first = 50_000 if prompt == "easy" else 0
    return [Draw(first + j, rng.choice(seeds), prompt, source) for j in range(n)]


def generator_draws(loop: LoopSection, pool: Sequence[Item], labels: Mapping[str, str],
                    rng: random.Random) -> list[Draw]:
    """The generator's draws for one iteration from B(t) (`pool`) and its verdict labels (Lion only)."""
    if loop.selection == "random":
        return draw(rng, pool, loop.new_per_iteration, "plain", "plain")
    by_id = {i.id: i for i in pool}
    # Sorted, so the same seeds are drawn (and the same requests re-served free) on resume.
    hard = [by_id[i] for i, lbl in sorted(labels.items()) if lbl == "hard" and i in by_id]
    easy = [by_id[i] for i, lbl in sorted(labels.items()) if lbl == "easy" and i in by_id]
    n_hard = round(loop.new_per_iteration * loop.hard_fraction)
    n_easy = loop.new_per_iteration - n_hard
    hard_draws = draw(rng, hard, n_hard, "hard", "hard") if hard else draw(rng, easy, n_hard, "hard",
                                                                            "hard_prompt_easy_seed")
    easy_draws = draw(rng, easy, n_easy, "easy", "easy") if easy else draw(rng, hard, n_easy, "easy",
                                                                            "easy_prompt_hard_seed")
    return hard_draws + easy_draws


def judge_metrics(labels: Mapping[str, str], sample: Sequence[Item], t: int,
                  disagreement_rate: float | None) -> dict[str, float | None]:
    """Discrimination metrics of iteration t. An unscored pair says nothing about hardness, so hard share
    and hard yield (the share of hard-seeded children of t-1 judged hard now) are over scored verdicts."""
    scored = {i: lbl for i, lbl in labels.items() if lbl != "unscored"}
    children = [i for i in sample if i.source == "hard" and i.iteration == t and i.id in scored]
    return {
        "judged": len(labels),
        "scored": len(scored),
        "hard_share": sum(lbl == "hard" for lbl in scored.values()) / len(scored) if scored else None,
        "unscored_share": (len(labels) - len(scored)) / len(labels) if labels else None,
        "order_disagreement_rate": disagreement_rate,
        "hard_yield": sum(scored[i.id] == "hard" for i in children) / len(children) if children else None,
    }
