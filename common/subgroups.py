"""Subgroups for fairness evaluation: which attributes, which groups, and their names.

Both sides agree on these names: the run settings name the attributes (validated on
load against the task's schema), each site splits its test patients into the groups,
and the coordinator combines the groups by name. An attribute is a binary or
categorical column of the task's schema (its values are the groups; ``sex`` reads
female/male, coded 0/1 as in the UCI files) or ``age``, split into bands at public,
configured edges (``"50,65"`` gives ``<50``, ``50-64`` and ``65+``).

Imaging tasks have no clinical columns: their sites read ``sex`` and ``age`` from each
image's DICOM header (Patient's Sex F/M, coded as :data:`DICOM_SEX_CODES`, and Patient's
Age), with the same group names, so the coordinator pools imaging and clinical groups
alike; the settings accept only ``sex`` and ``age`` there. A site whose headers lack an
attribute (the Basic Profile de-identification removes both) says so per attribute.
"""

from __future__ import annotations

from itertools import pairwise

from medfed.common.tasks import Column, ImagingSpec, TaskSpec

AGE = "age"
SEX_LABELS = {0: "female", 1: "male"}
DICOM_SEX_CODES = {"F": 0, "M": 1}  # Patient's Sex (0010,0040) -> the code of SEX_LABELS
MISSING_LABEL = "missing"
IMAGING_ATTRIBUTES = ("sex", "age")


def parse_attributes(text: str) -> tuple[str, ...]:
    """``"sex, age"`` -> ``("sex", "age")``; empty text means fairness evaluation is off."""
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"'fairness-groups' names {', '.join(repeated)} more than once")
    return names


def parse_age_bands(text: str) -> tuple[int, ...]:
    """``"50,65"`` -> ``(50, 65)``: whole years, strictly increasing, at least one edge."""
    parts = [part.strip() for part in text.split(",") if part.strip()]
    try:
        edges = tuple(int(part) for part in parts)
    except ValueError:
        raise ValueError(
            f"'age-bands' must be whole years separated by commas, e.g. '50,65' (got {text!r})"
        ) from None
    if not edges or any(b <= a for a, b in pairwise(edges)):
        raise ValueError(
            f"'age-bands' must be one or more strictly increasing ages, e.g. '50,65' (got {text!r})"
        )
    return edges


def band_labels(edges: tuple[int, ...]) -> list[str]:
    """Readable band names: ``(50, 65)`` -> ``["<50", "50-64", "65+"]``."""
    inner = [f"{a}-{b - 1}" if b - 1 > a else f"{a}" for a, b in pairwise(edges)]
    return [f"<{edges[0]}", *inner, f"{edges[-1]}+"]


def eligible_attributes(spec: TaskSpec | ImagingSpec) -> tuple[str, ...]:
    """Attributes a task can be split by: its binary/categorical columns and ``age``."""
    if isinstance(spec, ImagingSpec):
        return IMAGING_ATTRIBUTES
    return tuple(
        c.name for c in spec.columns if c.kind in ("binary", "categorical") or c.name == AGE
    )


def check_attributes(spec: TaskSpec | ImagingSpec, names: tuple[str, ...]) -> None:
    """ValueError naming each attribute the task cannot be split by, and what it can."""
    allowed = eligible_attributes(spec)
    unknown = [n for n in names if n not in allowed]
    if not unknown:
        return
    if isinstance(spec, ImagingSpec):
        detail = f"imaging has no clinical columns; allowed: {', '.join(allowed)}"
    else:
        detail = (
            f"columns: {', '.join(c.name for c in spec.columns)}; allowed: "
            f"{', '.join(allowed)} (binary or categorical columns, or age in bands)"
        )
    raise ValueError(
        f"'fairness-groups': {', '.join(repr(n) for n in unknown)} is not a subgroup "
        f"attribute of task {spec.task!r} on {spec.dataset!r} ({detail})"
    )


def check_age_edges(spec: TaskSpec | ImagingSpec, edges: tuple[int, ...]) -> None:
    """ValueError when a band edge lies outside the task's public age range."""
    if isinstance(spec, ImagingSpec):
        return
    age = next((c for c in spec.columns if c.name == AGE), None)
    if age is None:
        return
    outside = [e for e in edges if not age.low < e <= age.high]
    if outside:
        raise ValueError(
            f"'age-bands': edge(s) {', '.join(map(str, outside))} outside the age "
            f"range ({age.low:g}, {age.high:g}] of task {spec.task!r} on {spec.dataset!r}"
        )


def value_label(column: Column, value: float) -> str:
    """The group name of one value of a binary or categorical column."""
    if column.name == "sex" and value in SEX_LABELS:
        return SEX_LABELS[int(value)]
    return f"{value:g}"


def group_name(attribute: str, label: str) -> str:
    """``("sex", "female")`` -> ``"sex=female"``: how groups are named on the wire."""
    return f"{attribute}={label}"


def attribute_of(group: str) -> str:
    """``"age=50-64"`` -> ``"age"``."""
    return group.split("=", 1)[0]
