"""Instance annotations (segflow/data/instances.py): COCO, instance PNGs (Cityscapes too), per-object masks and
connected components all read to one stored form; every bad case is refused by its rule, naming the file."""

from __future__ import annotations

import json
import pickle
import random

import numpy as np
import pytest
from pycocotools import mask as coco_mask

from segflow.data.checks import Problem, Problems
from segflow.data.instances import cells_from_label, discover
from segflow.errors import SegflowError
from tests.datasets import save, tree_hashes

H, W = 20, 24
CLASSES = ["car", "person"]
CATEGORIES = [{"id": 3, "name": "car"}, {"id": 7, "name": "person"}, {"id": 9, "name": "bus"}]  # bus: unused
CATEGORY_ID = {0: 3, 1: 7}
ANN_IDS = [10, 20, 30, 40]


def rect(x0, y0, x1, y1) -> tuple[np.ndarray, list[float]]:
    """Pixels x0..x1-1, y0..y1-1, and the polygon along their outer edges."""
    mask = np.zeros((H, W), dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask, [x0, y0, x1, y0, x1, y1, x0, y1]


def ellipse(cx, cy, rx, ry) -> tuple[np.ndarray, list[float]]:
    """The pixels whose centres lie in the ellipse, and the polygon tracing their outer edges row by row."""
    ys, xs = np.mgrid[0:H, 0:W]
    mask = ((xs + 0.5 - cx) / rx) ** 2 + ((ys + 0.5 - cy) / ry) ** 2 <= 1
    right, left = [], []
    for y in (y for y in range(H) if mask[y].any()):
        x = np.flatnonzero(mask[y])
        right += [int(x[-1]) + 1, y, int(x[-1]) + 1, y + 1]
        left = [int(x[0]), y + 1, int(x[0]), y, *left]
    return mask, right + left


# The scene, in painting order: two touching rectangles, an ellipse over the second, an L (class: index).
SHAPES = [
    (*rect(2, 2, 8, 8), 0),
    (*rect(8, 2, 12, 6), 0),
    (*ellipse(12, 6, 4, 3), 1),
    (np.zeros((H, W), dtype=bool), [14, 13, 22, 13, 22, 15, 16, 15, 16, 19, 14, 19], 1),
]
SHAPES[3][0][13:15, 14:22] = SHAPES[3][0][15:19, 14:16] = True
IMAGE = np.random.default_rng(0).integers(0, 255, (H, W), dtype=np.uint8)


def expected() -> tuple[np.ndarray, list[dict]]:
    instances = np.zeros((H, W), dtype=np.uint16)
    for number, (mask, _, _) in enumerate(SHAPES, 1):
        instances[mask] = number
    table = [{"instance": k, "class": cls, "crowd": False} for k, (_, _, cls) in enumerate(SHAPES, 1)]
    return instances, table


def test_the_scene_has_a_touching_pair_and_an_overlap():
    (a, _, _), (b, _, _), (c, _, _), _ = SHAPES
    assert not (a & b).any() and (np.roll(a, 1, axis=1) & b).any(), "a and b share an edge"
    assert (b & c).any() and (b & ~c).any(), "c covers part of b"
    instances, _ = expected()
    assert set(np.unique(instances)) == {0, 1, 2, 3, 4}


# --- writers ------------------------------------------------------------------------------------------------


def runs(mask: np.ndarray) -> list[int]:
    """Uncompressed COCO RLE counts (column-major runs, starting with background)."""
    flat = mask.T.ravel().astype(np.int8)
    edges = np.flatnonzero(np.diff(flat)) + 1
    lengths = np.diff(np.concatenate([[0], edges, [flat.size]])).tolist()
    return ([0] if flat[0] else []) + lengths


def segmentation(mask: np.ndarray, polygon: list, kind: str):
    if kind == "polygon":
        return [polygon]
    if kind == "rle":
        return {"size": [H, W], "counts": runs(mask)}
    return {"size": [H, W], "counts": coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"].decode()}


def write_coco(root, kind="polygon", file_name="sub/a.png", shuffle=True, edit=None):
    """``root/images/<file_name>`` and ``root/annotations/instances.json`` for the scene."""
    save(root / "images" / file_name, IMAGE)
    anns = [
        {
            "id": ann_id,
            "image_id": 1,
            "category_id": CATEGORY_ID[cls],
            "segmentation": segmentation(mask, polygon, kind),
            "iscrowd": 0,
            "area": int(mask.sum()),
        }
        for ann_id, (mask, polygon, cls) in zip(ANN_IDS, SHAPES, strict=True)
    ]
    if shuffle:  # the file's order is not the numbering order: annotation ids are
        random.Random(1).shuffle(anns)
    data = {"images": [{"id": 1, "file_name": file_name, "width": W, "height": H}], "annotations": anns}
    data["categories"] = CATEGORIES
    if edit:
        edit(data)
    path = root / "annotations" / "instances.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def write_png(root, values: list[int], bits=8, stuff=None):
    save(root / "images" / "a.png", IMAGE)
    mask = np.zeros((H, W), dtype=np.uint16 if bits == 16 else np.uint8)
    if stuff is not None:
        mask[:, :] = stuff
    for value, (shape, _, _) in zip(values, SHAPES, strict=True):
        mask[shape] = value
    save(root / "masks" / "a.png", mask)


def write_per_object(root, shapes=None):
    save(root / "a" / "images" / "a.png", IMAGE)
    for i, (mask, _, _) in enumerate(shapes or SHAPES):
        save(root / "a" / "masks" / f"m{i}.png", mask.astype(np.uint8) * 255)


class Collect(Problems):
    """on_bad: skip, keeping the Problems themselves."""

    def __init__(self):
        super().__init__("skip")
        self.found: list[Problem] = []

    def add(self, problem: Problem) -> None:
        self.found.append(problem)
        super().add(problem)


def read_all(root, layout, classes=CLASSES, **keys):
    """(items, what each good one reads, every Problem from discovery and reading) under on_bad: skip."""
    problems = Collect()
    items = discover(root, layout, classes=classes, label="ds/", problems=problems, **keys)
    found = list(problems.found)
    results = []
    for item in items:
        try:
            results.append(item.read(10**6, "full_range"))
        except Problem as problem:
            found.append(problem)
    return items, results, found


# --- every layout, one scene --------------------------------------------------------------------------------


CASES = {
    "coco_polygons": lambda root: (write_coco(root, "polygon"), {"annotations": "annotations/instances.json"}),
    "coco_rle": lambda root: (write_coco(root, "rle"), {"annotations": "annotations/instances.json"}),
    "coco_compressed_rle": lambda root: (write_coco(root, "compressed"), {"annotations": "annotations/instances.json"}),
    "png_8bit": lambda root: (
        write_png(root, [5, 9, 17, 200]),
        {"class_table": {5: "car", 9: "car", 17: "person", 200: "person"}},
    ),
    "png_16bit": lambda root: (
        write_png(root, [300, 1000, 40000, 65000], bits=16),
        {"class_table": {300: "car", 1000: "car", 40000: "person", 65000: "person"}},
    ),
    "cityscapes": lambda root: (write_png(root, [1000, 1001, 2000, 2001], bits=16, stuff=7), {"cityscapes": True}),
    "cityscapes_label_ids": lambda root: (
        write_png(root, [24000, 24003, 26000, 26001], bits=16, stuff=26),
        {"cityscapes": True, "class_table": {24: "car", 26: "person"}},
    ),
}
LAYOUT = {"coco": "coco", "png": "instance_png", "cityscapes": "instance_png"}


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_layout_reads_the_same_instances(tmp_path, case):
    root = tmp_path / "ds"
    _, keys = CASES[case](root)
    before = tree_hashes(root)
    items, results, problems = read_all(root, LAYOUT[case.split("_")[0]], **keys)
    assert problems == []
    assert [item.id for item in items] == ["sub__a" if case.startswith("coco") else "a"]
    image, instances, table, provenance = results[0]
    want, want_table = expected()
    assert image.shape == (H, W, 1) and np.array_equal(image[..., 0], IMAGE)
    assert instances.dtype == np.uint16 and np.array_equal(instances, want)
    assert table == want_table
    assert provenance["source_image"] == items[0].image_name == f"ds/images/{'sub/' if 'coco' in case else ''}a.png"
    assert len(provenance["sha256_image"]) == len(provenance["sha256_mask"]) == 64
    assert tree_hashes(root) == before, "the source files are read, never written"


def test_per_object_reads_the_same_instances(tmp_path):
    root = tmp_path / "dsb"
    write_per_object(root)
    before = tree_hashes(root)
    items, results, problems = read_all(root, "per_object", classes=["nucleus"])
    assert problems == [] and [item.id for item in items] == ["a"]
    assert items[0].annotation_name == "ds/a/masks/"
    _, instances, table, _ = results[0]
    want, want_table = expected()
    assert np.array_equal(instances, want)
    assert table == [dict(row, **{"class": 0}) for row in want_table]
    assert tree_hashes(root) == before


def test_label_components_are_the_regions_of_one_value(tmp_path):
    root = tmp_path / "isbi"
    save(root / "images" / "s.png", IMAGE)
    label = np.zeros((H, W), dtype=np.uint8)
    label[1:5, 1:5] = label[10:14, 2:9] = 255  # two cells
    label[5, 5] = 255  # touches the first cell at a corner only: its own region, one pixel, dropped
    label[0, 20:24] = 255  # a border sliver of 4 pixels: kept at min_area 2
    save(root / "masks" / "s.png", label)
    before = tree_hashes(root)
    _, results, problems = read_all(root, "label_components", classes=["cell"], component_value=255)
    assert problems == []
    _, instances, table, _ = results[0]
    want = np.zeros((H, W), dtype=np.uint16)
    want[0, 20:24], want[1:5, 1:5], want[10:14, 2:9] = 1, 2, 3  # scipy's raster order
    assert np.array_equal(instances, want)
    assert table == [{"instance": k, "class": 0, "crowd": False} for k in (1, 2, 3)]
    assert tree_hashes(root) == before
    with pytest.raises(SegflowError, match="component_value"):
        discover(root, "label_components", classes=["cell"], label="ds/", problems=Problems("skip"))


def test_cells_from_label_connectivity():
    label = np.array(
        [
            [1, 1, 0, 0, 0],
            [1, 1, 0, 0, 0],
            [0, 0, 1, 1, 0],  # touches the first region only diagonally
            [0, 0, 1, 1, 0],
            [0, 0, 0, 0, 1],
        ],
        dtype=np.uint8,
    )
    four = cells_from_label(label, 1)
    assert four.dtype == np.uint16 and four.max() == 3
    assert four[0, 0] == 1 and four[2, 2] == 2 and four[4, 4] == 3
    eight = cells_from_label(label, 1, connectivity=8)
    assert eight.max() == 1 and np.array_equal(eight > 0, label == 1)
    assert cells_from_label(label, 0).max() == 2 and cells_from_label(label, 0, connectivity=8).max() == 1
    with pytest.raises(ValueError, match="connectivity"):
        cells_from_label(label, 1, connectivity=6)


def test_coco_crowd_negatives_and_canonical_provenance(tmp_path):
    def crowd(data):
        next(a for a in data["annotations"] if a["id"] == 30)["iscrowd"] = 1  # the ellipse
        data["images"].append({"id": 2, "file_name": "b.png", "width": W, "height": H})

    root = tmp_path / "ds"
    write_coco(root, "rle", edit=crowd)
    save(root / "images" / "b.png", IMAGE)
    items, results, problems = read_all(root, "coco", annotations="annotations/instances.json")
    assert problems == [] and [item.id for item in items] == ["b", "sub__a"]
    assert [row["crowd"] for row in results[1][2]] == [False, False, True, False]
    assert results[0][2] == [] and not results[0][1].any(), "an image listed without annotations is a negative"
    assert pickle.loads(pickle.dumps(items[1])).read(10**6, "full_range")[2] == results[1][2]

    # The annotations' sha256 is of their canonical form: the file's order and spacing do not change it.
    other = tmp_path / "other"
    write_coco(other, "rle", edit=crowd, shuffle=False)
    save(other / "images" / "b.png", IMAGE)
    data = json.loads((other / "annotations" / "instances.json").read_text())
    data["annotations"].sort(key=lambda a: -a["id"])
    (other / "annotations" / "instances.json").write_text(json.dumps(data, indent=2))
    _, again, _ = read_all(other, "coco", annotations="annotations/instances.json")
    assert again[1][3]["sha256_mask"] == results[1][3]["sha256_mask"]

    _, _, refused = read_all(root, "coco", annotations="annotations/instances.json", negatives="refuse")
    assert [(p.rule, p.file) for p in refused] == [("image_without_annotations", "ds/images/b.png")]


# --- bad cases ----------------------------------------------------------------------------------------------

JSON_NAME = "ds/annotations/instances.json"
ANN_NAME = f"{JSON_NAME} (image sub/a.png)"


def _coco(edit=None, kind="polygon"):
    def make(root):
        write_coco(root, kind, edit=edit)
        return "coco", {"annotations": "annotations/instances.json"}

    return make


def _ann(i, **fields):
    def edit(data):
        next(a for a in data["annotations"] if a["id"] == ANN_IDS[i]).update(fields)

    return edit


def _extra_file(root):
    write_coco(root)
    save(root / "images" / "stray.png", IMAGE)
    return "coco", {"annotations": "annotations/instances.json"}


def _missing_file(data):
    data["images"].append({"id": 2, "file_name": "gone.png", "width": W, "height": H})


def _png(mask, image_size=(H, W), name="a", classes_keys=None):
    def make(root):
        save(root / "images" / f"{name}.png", np.zeros(image_size, dtype=np.uint8))
        save(root / "masks" / "a.png", mask)
        return "instance_png", classes_keys or {"class_table": {1: "car", 2: "person"}}

    return make


def _one_pixel():
    mask = np.zeros((H, W), dtype=np.uint8)
    mask[2:6, 2:6], mask[10, 10] = 1, 2
    return mask


def _per_object(shapes):
    def make(root):
        write_per_object(root, shapes)
        return "per_object", {"classes": ["nucleus"]}

    return make


def _unmapped():
    mask = np.zeros((H, W), dtype=np.uint8)
    mask[2:6, 2:6], mask[10:12, 10:12] = 1, 3
    return mask


BAD = {
    "polygon_outside": (_coco(_ann(0, segmentation=[[2, 2, W + 1, 2, W + 1, 8, 2, 8]])), "polygon_outside", ANN_NAME),
    "unknown_category": (_coco(_ann(1, category_id=9)), "unknown_category", JSON_NAME),
    "unlisted_category_id": (_coco(_ann(1, category_id=99)), "unknown_category", JSON_NAME),
    "coco_one_pixel": (_coco(_ann(3, segmentation=[[20, 1, 21, 1, 21, 2, 20, 2]])), "small_instance", ANN_NAME),
    "coco_hidden": (_coco(_ann(0, segmentation=[[11, 5, 13, 5, 13, 7, 11, 7]])), "small_instance", ANN_NAME),
    "duplicate_annotation_id": (_coco(_ann(2, id=ANN_IDS[0])), "same_annotation_id", JSON_NAME),
    "annotated_size": (_coco(lambda d: d["images"][0].update(width=W + 1)), "annotated_size", ANN_NAME),
    "short_rle": (_coco(_ann(0, segmentation={"size": [H, W], "counts": [5, 3]})), "bad_segmentation", ANN_NAME),
    "bad_compressed_rle": (
        _coco(_ann(0, segmentation={"size": [H, W], "counts": "5220003"})),
        "bad_segmentation",
        ANN_NAME,
    ),
    "unlisted_image_file": (_extra_file, "not_in_annotations", "ds/images/stray.png"),
    "listed_image_missing": (_coco(_missing_file), "listed_but_missing", JSON_NAME),
    "orphan_annotation": (_coco(_ann(0, image_id=5)), "orphan_annotations", JSON_NAME),
    "png_one_pixel": (_png(_one_pixel()), "small_instance", "ds/masks/a.png"),
    "png_unmapped_value": (_png(_unmapped()), "bad_mask_value", "ds/masks/a.png"),
    "png_size_mismatch": (_png(_one_pixel(), image_size=(H, W + 2)), "size_mismatch", "ds/masks/a.png"),
    "missing_mask": (_png(_one_pixel(), name="b"), "image_without_mask", "ds/images/b.png"),
    "mask_without_image": (_png(_one_pixel(), name="b"), "mask_without_image", "ds/masks/a.png"),
    "per_object_same": (_per_object([SHAPES[0], SHAPES[1], SHAPES[1]]), "same_instance", "ds/a/masks/m2.png"),
    "per_object_covered": (
        _per_object([(rect(11, 5, 13, 7)[0], None, 0), SHAPES[2]]),
        "small_instance",
        "ds/a/masks/m0.png",
    ),
}
#: Cases whose problem is with another file or entry: the scene's own image is still read.
FILE_LEVEL = {"listed_image_missing", "orphan_annotation", "unlisted_image_file"}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_refused_by_its_rule_naming_the_file(tmp_path, case):
    make, rule, file = BAD[case]
    root = tmp_path / "ds"
    layout, keys = make(root)
    before = tree_hashes(root)
    classes = keys.pop("classes", CLASSES)
    _, results, problems = read_all(root, layout, classes=classes, **keys)
    assert (rule, file) in [(p.rule, p.file) for p in problems], [p.line() for p in problems]
    if case in FILE_LEVEL:
        assert len(results) == 1, "a problem with another file leaves the scene's image in"
    else:
        assert results == [], "the image is left out"
    for problem in problems:
        line = problem.line()
        assert line.startswith(f"{problem.file}: ") and ";" in line and "\n" not in line, line
    assert tree_hashes(root) == before
    # on_bad: stop fails with the first problem's line.
    stop = Problems("stop")
    with pytest.raises(SegflowError, match=r"ingest\.on_bad: skip"):
        for item in discover(root, layout, classes=classes, label="ds/", problems=stop, **keys):
            try:
                item.read(10**6, "full_range")
            except Problem as problem:
                stop.add(problem)


def test_polygon_vertices_may_lie_half_a_pixel_outside(tmp_path):
    write_coco(tmp_path / "ds", edit=_ann(0, segmentation=[[-0.5, -0.5, 8, -0.5, 8, 8, -0.5, 8]]))
    _, results, problems = read_all(tmp_path / "ds", "coco", annotations="annotations/instances.json")
    assert problems == []
    assert (results[0][1] == 1).sum() == 8 * 8, "the half pixel outside adds no pixel"


def test_a_hidden_instance_says_it_was_painted_over(tmp_path):
    write_coco(tmp_path / "ds", edit=_ann(0, segmentation=[[11, 5, 13, 5, 13, 7, 11, 7]]))
    _, _, problems = read_all(tmp_path / "ds", "coco", annotations="annotations/instances.json")
    assert [p.line() for p in problems] == [
        f"{ANN_NAME}: annotation 10 has 0 visible pixel(s) once later ones are painted over it, fewer than "
        "ingest.min_area (2): an empty or one-pixel instance; remove it or redraw it"
    ]
    # A Problem crosses to a worker process and back with its details.
    assert pickle.loads(pickle.dumps(problems[0])).line() == problems[0].line()


@pytest.mark.parametrize(
    "text", ['{"images": [', "not json", '{"annotations": []}', '{"images": [{"id": 1}]}', "\udcff"]
)
def test_malformed_json_is_one_line_naming_the_file(tmp_path, text):
    root = tmp_path / "ds"
    write_coco(root)
    path = root / "annotations" / "instances.json"
    path.write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(SegflowError) as raised:
        discover(
            root,
            "coco",
            classes=CLASSES,
            label="ds/",
            problems=Problems("skip"),
            annotations="annotations/instances.json",
        )
    message = str(raised.value)
    assert message.startswith(f"{JSON_NAME}: ") and "\n" not in message


def test_settings_that_do_not_fit_the_layout(tmp_path):
    root = tmp_path / "ds"
    write_png(root, [1, 2, 3, 4])
    run = lambda layout, **keys: discover(root, layout, label="ds/", problems=Problems("skip"), **keys)  # noqa: E731
    with pytest.raises(SegflowError, match=r"set ingest\.instance_classes .* or ingest\.cityscapes"):
        run("instance_png", classes=CLASSES)
    with pytest.raises(SegflowError, match="'bus', which is not in classes"):
        run("instance_png", classes=CLASSES, class_table={1: "bus"})
    with pytest.raises(SegflowError, match="per_object holds one class"):
        run("per_object", classes=CLASSES)
    with pytest.raises(SegflowError, match=r"ingest\.annotations"):
        run("coco", classes=CLASSES)
    # One class: every object is that class.
    (item,) = run("instance_png", classes=["thing"])
    assert [row["class"] for row in item.read(10**6, "full_range")[2]] == [0, 0, 0, 0]


def test_coco_category_ids_are_kept_for_predictions(tmp_path):
    # The file's own ids (car 3, person 7) go to the report, so predict's COCO JSON speaks the same ids;
    # a class the file never annotates gets one above them, not a clash with an unused category (bus 9 unused).
    from segflow.data.ingest import coco_category_ids

    root = tmp_path / "ds"
    write_coco(root, "polygon")
    items, _, _ = read_all(root, "coco", annotations="annotations/instances.json")
    assert coco_category_ids(items, CLASSES) == {"car": 3, "person": 7}
    assert coco_category_ids(items, ["person", "car", "truck"]) == {"person": 7, "car": 3, "truck": 8}
    # Training reads them from ingest's report into the card (1, 2, ... when ingest read no COCO file).
    from segflow.instance.train import category_ids

    (tmp_path / "report.json").write_text(json.dumps({"source": {"category_ids": {"car": 3, "person": 7}}}))
    assert category_ids(tmp_path, ["person", "car"]) == [7, 3]
    assert category_ids(tmp_path / "none", ["person", "car"]) == [1, 2]
