"""A data-to-text task in the spirit of the E2E restaurant dataset, generated with a fixed seed.

A meaning representation (MR) of 4-7 slots → one sentence. The sentence is a deterministic function of the MR
(the slots present pick the clauses, in a fixed order), so exact match is a fair metric. Names and landmarks
are built from disjoint syllable pools for train and held-out, so held-out values never occur in training:
a prefix that memorises training names instead of copying its input scores nothing (docs/training.md).

    python -m bench.e2e_data --out bench/out/e2e   # writes train.jsonl, test.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass
from pathlib import Path

EAT_TYPES = ("restaurant", "coffee shop", "pub")
FOODS = ("Italian", "French", "Chinese", "Indian", "Japanese", "English", "fast food")
PRICES = ("cheap", "moderately priced", "expensive")
AREAS = ("city centre", "riverside")
RATINGS = ("low", "average", "high")
# Disjoint pools: train names/landmarks use the first halves, held-out ones the second halves.
_NAME_A = ("Bar", "Cor", "Fen", "Gal", "Hol", "Kin", "Lam", "Mor", "Nor", "Pel", "Ros", "Tam")
_NAME_B = ("bridge", "wick", "ton", "field", "more", "dale", "side", "mouth", "stead", "haven")
_NAME_A_TEST = ("Dun", "Esk", "Jor", "Quin", "Vel", "Wes", "Yar", "Zel")
_NAME_B_TEST = ("croft", "gate", "holm", "ley", "port", "worth")
_KINDS = ("The {} Arms", "The {}", "{} House", "The Golden {}", "{} Corner")


@dataclass(frozen=True)
class Example:
    mr: dict[str, str]
    prompt: str
    completion: str

    def record(self) -> dict[str, str]:
        return {"prompt": self.prompt, "completion": self.completion}


def _name(rng: random.Random, held_out: bool) -> str:
    a, b = (_NAME_A_TEST, _NAME_B_TEST) if held_out else (_NAME_A, _NAME_B)
    return rng.choice(_KINDS).format(rng.choice(a) + rng.choice(b))


def random_mr(rng: random.Random, held_out: bool) -> dict[str, str]:
    """A meaning representation of 4-7 slots; names and landmarks from the held-out pools when `held_out`."""
    mr = {"name": _name(rng, held_out), "eatType": rng.choice(EAT_TYPES)}
    optional = {
        "food": rng.choice(FOODS),
        "priceRange": rng.choice(PRICES),
        "area": rng.choice(AREAS),
        "customerRating": rng.choice(RATINGS),
        "familyFriendly": rng.choice(("yes", "no")),
        "near": _name(rng, held_out),
    }
    for key in rng.sample(sorted(optional), rng.randint(2, 5)):
        mr[key] = optional[key]
    return mr


def render_mr(mr: dict[str, str]) -> str:
    """The input text: `key[value]` pairs in a fixed key order."""
    order = ("name", "eatType", "food", "priceRange", "area", "customerRating", "familyFriendly", "near")
    return ", ".join(f"{k}[{mr[k]}]" for k in order if k in mr)


def realise(mr: dict[str, str]) -> str:
    """The one reference sentence for an MR."""
    desc = " ".join(x for x in (mr.get("priceRange"), mr.get("food"), mr["eatType"]) if x)
    article = "an" if desc[0].lower() in "aeiou" else "a"
    s = f"{mr['name']} is {article} {desc}"
    if "area" in mr:
        s += f" in the {mr['area']}"
    if "near" in mr:
        s += f" near {mr['near']}"
    s += "."
    extras = []
    if "customerRating" in mr:
        rating = mr["customerRating"]
        extras.append(f"it has {'an' if rating[0] in 'aeiou' else 'a'} {rating} customer rating")
    if "familyFriendly" in mr:
        extras.append("it is family friendly" if mr["familyFriendly"] == "yes" else "it is not family friendly")
    if extras:
        s += " " + " and ".join(extras).capitalize() + "."
    return s


def make_example(mr: dict[str, str]) -> Example:
    return Example(mr=mr, prompt=f"{render_mr(mr)}\nSentence:", completion=" " + realise(mr))


def generate(n_train: int = 400, n_test: int = 100, seed: int = 0) -> tuple[list[Example], list[Example]]:
    """Train and held-out sets; no held-out name or landmark occurs in training (asserted)."""
    rng = random.Random(seed)
    train = [make_example(random_mr(rng, held_out=False)) for _ in range(n_train)]
    test = [make_example(random_mr(rng, held_out=True)) for _ in range(n_test)]
    seen = {v for e in train for k, v in e.mr.items() if k in ("name", "near")}
    assert not seen & {v for e in test for k, v in e.mr.items() if k in ("name", "near")}
    return train, test


def write_jsonl(path: Path, examples: list[Example]) -> None:
    path.write_text("".join(json.dumps(e.record()) + "\n" for e in examples))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/out/e2e")
    ap.add_argument("--train", type=int, default=400)
    ap.add_argument("--test", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train, test = generate(args.train, args.test, args.seed)
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "test.jsonl", test)


if __name__ == "__main__":
    main()


def score(hyps: list[str], refs: list[str]) -> dict[str, float]:
    """Exact match (%) and corpus BLEU of `hyps` against `refs`, compared stripped."""
    import sacrebleu  # a bench-only dependency (dev extras), loaded only when scoring

    exact = sum(h.strip() == r.strip() for h, r in zip(hyps, refs, strict=True)) / len(refs)
    bleu = sacrebleu.corpus_bleu([h.strip() for h in hyps], [[r.strip() for r in refs]]).score
    return {"exact_match": 100 * exact, "bleu": bleu}

