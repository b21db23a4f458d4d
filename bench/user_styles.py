"""Per-user phrasings of the data-to-text task, generated with a fixed seed: the personalization benchmarks' data.

The input is bench/e2e_data.py's meaning representation (MR); the output is one line written in a *task style*
shared by every user of an application (which facts, in which order, in which words) with each user's own
*quirks* on top (how names are written, the separator between facts, how ratings and families are put, how the
line opens and ends). Both are deterministic functions of the MR, so exact match is a fair metric. Names and
landmarks are made-up words from e2e_data's syllable pools, disjoint between training and held-out examples, so a
prefix has to copy them from the input: one that memorises training names scores nothing.

    python -m bench.user_styles            # prints a few examples of three users
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from bench.e2e_data import Example, random_mr, render_mr


@dataclass(frozen=True)
class Quirks:
    """One user's formatting preferences (each a choice among a few; `user_quirks` draws them from a seed)."""

    name_case: str  # "plain", "upper", "quoted"
    separator: str  # between facts after the opening
    rating: str  # "{r}" is replaced by low/average/high
    family_yes: str
    family_no: str
    opening: str  # put before the name
    ending: str  # after the last fact


_NAME_CASES = ("plain", "upper", "quoted")
_SEPARATORS = ("; ", " | ", " - ")
_RATINGS = ("rated {r}", "{r} reviews", "stars: {r}")
_FAMILIES = (("kids welcome", "no kids"), ("family friendly", "adults only"), ("good for families", "not for families"))
_OPENINGS = ("", "Try ", "Tip: ")
_ENDINGS = (".", "!", " :)")


def user_quirks(user: str) -> Quirks:
    """The quirks of user `user`: a deterministic draw (the same name always gets the same quirks)."""
    rng = random.Random(f"quirks:{user}")
    yes, no = rng.choice(_FAMILIES)
    return Quirks(name_case=rng.choice(_NAME_CASES), separator=rng.choice(_SEPARATORS), rating=rng.choice(_RATINGS),
                  family_yes=yes, family_no=no, opening=rng.choice(_OPENINGS), ending=rng.choice(_ENDINGS))


def _name(value: str, case: str) -> str:
    if case == "upper":
        return value.upper()
    if case == "quoted":
        return f'"{value}"'
    return value


def realise(mr: dict[str, str], q: Quirks) -> str:
    """The one reference line for an MR in the task style with quirks `q`.

    Task style: `<name>, <eat type>[ for <food> food]` then the facts price, area, landmark, rating, families
    (those present, in that order), e.g. `Tip: THE BARWICK ARMS, pub for Italian food; cheap; by the riverside;
    close to FENDALE HOUSE; rated high; kids welcome!`.
    """
    head = f"{q.opening}{_name(mr['name'], q.name_case)}, {mr['eatType']}"
    if "food" in mr:
        head += f" for {mr['food']}" + ("" if mr["food"].endswith("food") else " food")  # not "fast food food"
    facts = [head]
    if "priceRange" in mr:
        facts.append(mr["priceRange"])
    if "area" in mr:
        facts.append("in the centre" if mr["area"] == "city centre" else "by the riverside")
    if "near" in mr:
        facts.append(f"close to {_name(mr['near'], q.name_case)}")
    if "customerRating" in mr:
        facts.append(q.rating.format(r=mr["customerRating"]))
    if "familyFriendly" in mr:
        facts.append(q.family_yes if mr["familyFriendly"] == "yes" else q.family_no)
    return q.separator.join(facts) + q.ending


def make_example(mr: dict[str, str], q: Quirks) -> Example:
    return Example(mr=mr, prompt=f"{render_mr(mr)}\nLine:", completion=" " + realise(mr, q))


def generate_user(user: str, n_train: int, n_test: int, seed: int = 0) -> tuple[list[Example], list[Example]]:
    """`n_train` training and `n_test` held-out examples of `user`'s style; no held-out name or landmark occurs in
    training (asserted). The MRs depend on (user, seed), the phrasing on the user alone."""
    q = user_quirks(user)
    rng = random.Random(f"user-data:{user}:{seed}")
    train = [make_example(random_mr(rng, held_out=False), q) for _ in range(n_train)]
    test = [make_example(random_mr(rng, held_out=True), q) for _ in range(n_test)]
    seen = {v for e in train for k, v in e.mr.items() if k in ("name", "near")}
    assert not seen & {v for e in test for k, v in e.mr.items() if k in ("name", "near")}
    return train, test


def main() -> None:
    for user in ("ann", "bob", "cy"):
        train, _ = generate_user(user, 2, 0)
        print(user, user_quirks(user))
        for e in train:
            print(f"  {e.prompt!r} -> {e.completion!r}")


if __name__ == "__main__":
    main()
