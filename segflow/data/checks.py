"""What can be wrong with a user's dataset: every rule in one place, each with its message.

A :class:`Problem` names the file, the rule it breaks and what to do. With
``ingest.on_bad: stop`` the first problem fails the stage as one line; with
``skip`` the file (or pair) is left out and the problem is listed in the
data report. Nothing here touches the user's files.
"""

from __future__ import annotations

from segflow.errors import SegflowError

#: rule -> message template (after "<file>: "); the fields come from the :class:`Problem`'s details.
RULES: dict[str, str] = {
    "unreadable": "cannot be read ({reason}); replace it with a good copy or remove it",
    "not_an_image": "is not an image ({reason}); remove it from the dataset folder",
    "unsupported_mode": "is a {mode} image, which ingest cannot read; {fix}",
    "too_many_pixels": (
        "is {width}x{height} ({pixels:,} pixels), above ingest.max_pixels ({limit:,}); "
        "downscale or tile it, or raise ingest.max_pixels if it is genuine"
    ),
    "size_mismatch": "is {mask_size} but its image {image} is {image_size}; re-export the pair at one size",
    "bad_mask_value": "holds mask value {value} ({pixels:,} pixels), {expected}; {fix}",
    "image_without_mask": "has no mask (looked for {expected}); add the mask or remove the image",
    "mask_without_image": "has no image (looked for {expected}); add the image or remove the mask",
    "same_id": "has the same id '{id}' as {other}; rename one of them (ids are file names without extension)",
    "group_mismatch": "does not match ingest.group {pattern!r}; fix the pattern or the file name",
    "symlink_escape": "is a symbolic link to {target}, outside the dataset folder; copy the file in or remove the link",
    "archive_escape": "would be written outside the extraction folder ({reason}); repack the archive without it",
    "duplicate": "has the same pixels as {other}{straddle}; remove one of the two",
    "listed_but_missing": "lists '{id}', but the dataset has no {what} for it; fix the list or add the files",
    "empty_dataset": "holds no image/mask pairs (looked for {expected}); check ingest.path and ingest.layout",
    # Instance annotations (segflow/data/instances.py).
    "polygon_outside": (
        "annotation {annotation} has a polygon vertex at ({x:g}, {y:g}), outside the {width}x{height} image; "
        "fix the polygon, or the image's width/height in the JSON"
    ),
    "unknown_category": (
        "has {count} annotation(s) on {images} image(s) of category {category}, which is not in classes; "
        "add it to classes or remove its annotations"
    ),
    "small_instance": (
        "{what} has {pixels} visible pixel(s){hidden}, fewer than ingest.min_area ({min_area}): "
        "an empty or one-pixel instance; remove it or redraw it"
    ),
    "same_annotation_id": (
        "lists {count} {what} entries with {key} {id!r}; each {what} needs its own {key}: renumber or merge them"
    ),
    "same_instance": "holds the same object as {other} (identical masks); remove one of the two",
    "image_without_annotations": (
        "has no annotated object and ingest.negatives is refuse; annotate it, remove it, "
        "or set ingest.negatives: keep to keep it as an image without objects"
    ),
    "not_in_annotations": (
        "is not listed in the images of {annotations}; add an entry for it (with no annotations if it shows "
        "no object) or remove the file"
    ),
    "annotated_size": (
        "gives the image as {listed}, but {image} is {actual}; fix width/height in the JSON "
        "or re-export the annotations for the image as it is"
    ),
    "bad_segmentation": "annotation {annotation}: {reason}; fix or remove the annotation",
    "orphan_annotations": (
        "has {count} annotation(s) for image id(s) {ids}, which its images do not list; "
        "fix their image_id or remove them"
    ),
    "not_one_image": (
        "holds {found}, but the per_object layout expects exactly one image in <id>/images/ "
        "(and one mask per object in <id>/masks/); {fix}"
    ),
    "too_many_instances": (
        "has {count:,} objects, more than an instance-id image holds (65,535); split the image into tiles"
    ),
}


class Problem(Exception):
    """One thing wrong with one input file."""

    def __init__(self, rule: str, file: str, **details):
        if rule not in RULES:
            raise KeyError(f"no rule named {rule!r}")
        self.rule, self.file, self.details = rule, str(file), details
        super().__init__(self.line())

    def line(self) -> str:
        """The one-line message: the file, what is wrong, what to do."""
        return f"{self.file}: {RULES[self.rule].format(**self.details)}"

    def as_record(self, action: str) -> dict:
        """The report's entry for this problem."""
        return {"file": self.file, "rule": self.rule, "message": self.line(), "action": action}

    def __reduce__(self):  # picklable across worker processes, details included
        return (_rebuild, (self.rule, self.file, self.details))


def _rebuild(rule: str, file: str, details: dict) -> Problem:
    return Problem(rule, file, **details)


class Problems:
    """Collects problems under an ``on_bad`` policy: stop raises at the first, skip records them."""

    def __init__(self, on_bad: str):
        self.on_bad = on_bad
        self.records: list[dict] = []

    def add(self, problem: Problem) -> None:
        """Stop with the problem's line, or note it as skipped.

        Raises:
            SegflowError: ``on_bad`` is ``stop``.
        """
        if self.on_bad == "stop":
            raise SegflowError(
                f"{problem.line()} (or set ingest.on_bad: skip to leave such files out and list them in the report)"
            )
        self.records.append(problem.as_record("skipped"))
