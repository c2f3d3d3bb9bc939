"""Splitting a labelled set into training and validation, reproducibly.

The validation images are whole objects: all images of one group (an object,
or a harvest's dataset) fall on the same side, or validation would measure how
well the model recognises what it has seen. A set with too few groups for that
(a harvest of one dataset, the usual first try) is split by image instead, and
the split says so, since its validation scores are then optimistic.

An image is never on both sides either: rows naming the same image (Europeana's records
often share one, and a labelled set from `enrich review export` is grouped by record) are
one group with everything their groups hold, and the split by image keeps each image's
rows together.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from enrichment.errors import EnrichError


@dataclass(frozen=True)
class Split:
    """Indices for training and validation, and, when it fell back to rows, why."""

    train: list[int]
    validation: list[int]
    fallback: str | None = None


def split_by_group(
    groups: Sequence[str], fraction: float, seed: int
) -> tuple[list[int], list[int]]:
    """Indices for training and validation, with every group wholly on one side.

    Groups are shuffled with `seed` and moved to validation until it holds
    `fraction` of the images, so the split is reproducible.
    """
    if not 0.0 < fraction < 1.0:
        raise EnrichError(f"the validation fraction must be between 0 and 1, not {fraction}")
    members: dict[str, list[int]] = {}
    for index, group in enumerate(groups):
        members.setdefault(group, []).append(index)
    if len(members) < 2:
        raise EnrichError("cannot split a single object into training and validation")
    order = list(members)
    np.random.default_rng(seed).shuffle(order)
    wanted = max(1, round(fraction * len(groups)))
    validation: list[int] = []
    for group in order[:-1]:  # the last group always stays for training
        if len(validation) >= wanted:
            break
        validation.extend(members[group])
    held_out = set(validation)
    return [i for i in range(len(groups)) if i not in held_out], sorted(validation)


def joined_by_image(groups: Sequence[str], images: Sequence[str]) -> list[str]:
    """Each row's group, where groups that share an image are one (the first one's name)."""
    parent: dict[str, str] = {}

    def root(group: str) -> str:
        while parent.setdefault(group, group) != group:
            parent[group] = parent[parent[group]]
            group = parent[group]
        return group

    first_group: dict[str, str] = {}
    for group, image in zip(groups, images, strict=True):
        other = first_group.setdefault(image, group)
        one, two = root(other), root(group)
        if one != two:
            parent[two] = one
    return [root(group) for group in groups]


def split_groups_or_rows(
    groups: Sequence[str], fraction: float, seed: int, images: Sequence[str] | None = None
) -> Split:
    """By group when the groups can give validation about `fraction` of the images
    (between half and twice it); otherwise by image, with the reason in `fallback`. With
    `images` (each row's image), rows of one image are always on the same side."""
    rows = [str(row) for row in range(len(groups))] if images is None else list(images)
    if images is not None:
        groups = joined_by_image(groups, images)
    distinct = len(set(groups))
    if distinct >= 2:
        train, validation = split_by_group(groups, fraction, seed)
        if fraction / 2 <= len(validation) / len(groups) <= 2 * fraction:
            return Split(train, validation)
    if len(set(rows)) < 2:
        raise EnrichError("cannot split a single image into training and validation")
    train, validation = split_by_group(rows, fraction, seed)
    reason = (
        f"{distinct} group{'s' if distinct != 1 else ''} cannot give validation "
        f"{fraction:.0%} of the images with each group on one side: split by image instead "
        "(images of one group are on both sides, so validation scores may be optimistic)"
    )
    return Split(train, validation, reason)
