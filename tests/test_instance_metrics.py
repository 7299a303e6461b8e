"""COCO mask/box AP, counts and pixel IoU of segflow.instance.metrics on hand-made instances, each value
derived by hand (COCO: 101-point interpolated precision, IoU thresholds 0.50:0.05:0.95).

COCO's precision is tp / (tp + fp + eps): with a single true positive it is 1 - 2e-16, hence approx."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from segflow.instance.metrics import (
    ImagePrediction,
    ImageTruth,
    coco_ground_truth,
    coco_results,
    decode_rle,
    encode_rle,
    evaluate,
    evaluate_json,
    polygons_to_mask,
)

CLASSES = ["cell"]


def _square(y: int, x: int, size: int = 10, shape: tuple[int, int] = (32, 32)) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[y : y + size, x : x + size] = True
    return mask


def _truth(masks: list[np.ndarray], classes: list[int] | None = None, crowd=(), id_: str = "a") -> ImageTruth:
    instances = np.zeros(masks[0].shape if masks else (32, 32), np.uint16)
    for i, m in enumerate(masks, 1):
        instances[m] = i
    labels = classes or [0] * len(masks)
    return ImageTruth(id_, instances, {i: c for i, c in enumerate(labels, 1)}, frozenset(crowd))


def _pred(masks: list[np.ndarray], scores: list[float], classes: list[int] | None = None, id_: str = "a"):
    shape = masks[0].shape if masks else (32, 32)
    return ImagePrediction(
        id_,
        np.array(masks, bool).reshape(len(masks), *shape),
        np.array(classes or [0] * len(masks), np.int64),
        np.array(scores, float),
    )


def _walk(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from _walk(v)
    elif isinstance(value, list):
        for v in value:
            yield from _walk(v)
    else:
        yield value


def test_rle_round_trip_compressed_and_uncompressed():
    rng = np.random.default_rng(0)
    mask = rng.random((17, 23)) > 0.6
    rle = encode_rle(mask)
    assert rle["size"] == [17, 23] and isinstance(rle["counts"], str)
    json.dumps(rle)
    out = decode_rle(rle)
    assert out.dtype == np.uint8 and out.shape == (17, 23)
    np.testing.assert_array_equal(out, mask)
    np.testing.assert_array_equal(decode_rle({**rle, "counts": rle["counts"].encode()}, 17, 23), mask)
    # Uncompressed: run lengths over the column-major (Fortran) pixel order, starting with a run of zeros.
    flat = mask.flatten(order="F").astype(np.int8)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], flat, [2]])))  # [2]: always close the last run
    counts = np.diff(np.concatenate([[0], edges])).tolist()
    np.testing.assert_array_equal(decode_rle({"size": [17, 23], "counts": counts}), mask)
    with pytest.raises(ValueError):
        decode_rle(rle, 23, 17)


def test_polygon_convention():
    # pycocotools: pixel (x, y) is the square [x, x+1) x [y, y+1), so corners at 2 and 6 cover pixels 2..5,
    # and fractional corners snap to the nearest grid line (2.4 -> 2, 2.6 -> 3).
    expected = np.zeros((10, 12), np.uint8)
    expected[2:6, 2:6] = 1
    square = [2, 2, 6, 2, 6, 6, 2, 6]
    np.testing.assert_array_equal(polygons_to_mask([square], 10, 12), expected)
    np.testing.assert_array_equal(polygons_to_mask([[v + 0.4 for v in square]], 10, 12), expected)
    shifted = np.zeros((10, 12), np.uint8)
    shifted[3:7, 3:7] = 1
    np.testing.assert_array_equal(polygons_to_mask([[v + 0.6 for v in square]], 10, 12), shifted)
    # Several polygons are one object (their union).
    two = polygons_to_mask([square, [8, 0, 10, 0, 10, 1, 8, 1]], 10, 12)
    assert two.sum() == 16 + 2 and two[0, 8:10].all()


def test_results_entries():
    pred = _pred([_square(3, 4, 5)], [0.7], [1])
    (entry,) = coco_results(pred, [10, 20])
    assert entry["image_id"] == "a" and entry["category_id"] == 20 and entry["score"] == 0.7
    assert entry["bbox"] == [4.0, 3.0, 5.0, 5.0]
    json.dumps(entry)
    np.testing.assert_array_equal(decode_rle(entry["segmentation"]), _square(3, 4, 5))


def test_perfect_prediction():
    masks = [_square(2, 2), _square(15, 18, 12), _square(0, 20, 6)]
    out = evaluate([_truth(masks)], [_pred(masks, [0.9, 0.8, 0.7])], CLASSES)
    for kind in ("segm", "bbox"):
        assert out[kind]["map"] == 1.0 and out[kind]["map_50"] == 1.0 and out[kind]["mar"] == 1.0
        assert out[kind]["map_medium"] is None and out[kind]["map_large"] is None  # all objects are small
    assert out["segm_per_class"] == {"cell": {"ap": 1.0, "ap_50": 1.0, "n_true": 3}}
    assert out["counts"]["mean_abs_count_error"] == 0.0 and out["counts"]["true_total"] == 3
    assert out["semantic"]["iou"] == {"cell": 1.0} and out["semantic"]["dice_macro"] == 1.0
    assert out["images"] == 1 and out["score_threshold"] is None
    json.dumps(out)


def test_shifted_prediction_passes_four_thresholds():
    # 10x10 shifted 2 px: IoU = 80 / 120 = 0.667 passes 0.50, 0.55, 0.60, 0.65 (4 of 10); boxes alike.
    out = evaluate([_truth([_square(5, 5)])], [_pred([_square(5, 7)], [0.9])], CLASSES)
    for kind in ("segm", "bbox"):
        assert out[kind]["map_50"] == pytest.approx(1.0) and out[kind]["map_75"] == 0.0
        assert out[kind]["map"] == pytest.approx(0.4, abs=1e-12)
        assert out[kind]["map_small"] == pytest.approx(0.4, abs=1e-12)
    assert out["semantic"]["iou"]["cell"] == pytest.approx(80 / 120)
    assert out["semantic"]["dice"]["cell"] == pytest.approx(160 / 200)


def test_false_positive_ranked_first_halves_ap():
    # Ranked FP, TP: precision 0 then 1/2, interpolated 1/2 at every recall level -> AP 0.5.
    truth = _truth([_square(2, 2)])
    out = evaluate([truth], [_pred([_square(20, 20), _square(2, 2)], [0.9, 0.8])], CLASSES)
    assert out["segm"]["map"] == pytest.approx(0.5) and out["bbox"]["map"] == pytest.approx(0.5)
    assert out["counts"]["pred_total"] == 2 and out["counts"]["mean_abs_count_error"] == 1.0
    # Two truths ranked TP, FP, TP: recall .5 at precision 1, then recall 1 at precision 2/3:
    # 51 recall levels (0..0.50) at 1 and 50 at 2/3 -> (51 + 100/3) / 101.
    truth = _truth([_square(2, 2), _square(18, 18)])
    pred = _pred([_square(2, 2), _square(2, 20), _square(18, 18)], [0.9, 0.8, 0.7])
    out = evaluate([truth], [pred], CLASSES)
    assert out["segm"]["map"] == pytest.approx((51 + 100 / 3) / 101, abs=1e-12)


def test_prediction_on_crowd_is_neither_tp_nor_fp():
    truth = _truth([_square(2, 2), _square(18, 18, 12)], crowd={2})
    pred = _pred([_square(20, 20, 8), _square(2, 2)], [0.95, 0.6])  # the crowd hit outranks the TP
    out = evaluate([truth], [pred], CLASSES)
    assert out["segm"]["map"] == pytest.approx(1.0) and out["bbox"]["map"] == pytest.approx(1.0)  # FP first: 0.5
    assert out["segm_per_class"]["cell"]["n_true"] == 1 and out["counts"]["true_total"] == 1
    assert out["semantic"]["iou"]["cell"] == 1.0  # crowd pixels count nowhere
    # Without the crowd flag the same prediction is a miss-matched FP... and the crowd object a miss.
    out = evaluate([_truth([_square(2, 2), _square(18, 18, 12)])], [pred], CLASSES)
    assert out["segm"]["map"] < 1.0


def test_max_dets_caps_crowded_images():
    # 150 2x2 objects on a 4-px grid in one 64x64 image, all predicted exactly.
    masks = [_square(4 * (i // 16), 4 * (i % 16), 2, (64, 64)) for i in range(150)]
    truth, pred = _truth(masks), _pred(masks, list(np.linspace(0.99, 0.5, 150)))
    out = evaluate([truth], [pred], CLASSES, max_dets=300)
    assert out["segm"]["map"] == 1.0 and out["bbox"]["map"] == 1.0 and out["segm"]["mar"] == 1.0
    # With 100: recall stops at 2/3, so only recall levels 0..0.66 (67 of 101) have precision 1.
    out = evaluate([truth], [pred], CLASSES)
    assert out["segm"]["map"] == pytest.approx(67 / 101) and out["segm"]["mar"] == pytest.approx(100 / 150)
    assert evaluate([truth], [pred], CLASSES, max_dets=5)["segm"]["mar"] == pytest.approx(5 / 150)


def test_empty_and_absent():
    truths = [_truth([_square(2, 2)], id_="a"), _truth([], id_="empty")]
    out = evaluate(truths, [], [*CLASSES, "other"])
    assert out["segm"]["map"] == 0.0 and out["bbox"]["map"] == 0.0 and out["segm"]["mar"] == 0.0
    assert out["segm_per_class"]["other"] == {"ap": None, "ap_50": None, "n_true": 0}
    assert out["counts"]["per_image"] == [{"id": "a", "true": 1, "pred": 0}, {"id": "empty", "true": 0, "pred": 0}]
    assert out["semantic"]["iou"] == {"cell": 0.0, "other": None} and out["semantic"]["iou_macro"] == 0.0
    assert -1 not in list(_walk(out))
    # Below the count threshold: ranked by AP, not counted.
    out = evaluate(truths[:1], [_pred([_square(2, 2)], [0.3])], CLASSES)
    assert (
        out["segm"]["map"] == pytest.approx(1.0)
        and out["counts"]["pred_total"] == 0
        and out["semantic"]["iou"]["cell"] == 0.0
    )
    with pytest.raises(ValueError):
        evaluate(truths, [_pred([_square(2, 2)], [0.3], id_="unknown")], CLASSES)


def test_semantic_overlap_higher_score_wins():
    truth = _truth([_square(0, 0, 8, (16, 16)), _square(8, 8, 8, (16, 16))], [0, 1])
    big = np.zeros((16, 16), bool)
    big[:, :] = True
    # Class 1 covers everything at 0.6; the exact class-0 mask at 0.9 wins its 64 pixels.
    pred = _pred([big, _square(0, 0, 8, (16, 16))], [0.6, 0.9], [1, 0])
    out = evaluate([truth], [pred], ["a", "b"])
    assert out["semantic"]["iou"]["a"] == 1.0
    assert out["semantic"]["iou"]["b"] == pytest.approx(64 / 192)
    assert out["semantic"]["iou_macro"] == pytest.approx((1 + 64 / 192) / 2)


def _random_case(seed: int, n_images: int = 4, classes: int = 3):
    rng = np.random.default_rng(seed)
    truths, preds = [], []
    for i in range(n_images):
        h, w = rng.integers(24, 49, 2)
        instances = np.zeros((h, w), np.uint16)
        labels, masks, pclasses, scores = {}, [], [], []
        for iid in range(1, int(rng.integers(0, 9)) + 1):
            y, x = rng.integers(0, h - 4), rng.integers(0, w - 4)
            dy, dx = rng.integers(3, 16, 2)
            instances[y : y + dy, x : x + dx] = iid  # later objects overlap (and may erase) earlier ones
            labels[iid] = int(rng.integers(0, classes))
        present = [int(v) for v in np.unique(instances) if v]
        for iid in present:
            if rng.random() < 0.8:  # a jittered copy, sometimes the wrong class
                m = np.roll(instances == iid, tuple(rng.integers(-1, 2, 2)), (0, 1))
                masks.append(m)
                pclasses.append(labels[iid] if rng.random() < 0.85 else int(rng.integers(0, classes)))
                scores.append(float(rng.random()))
        for _ in range(int(rng.integers(0, 4))):  # false positives, some overlapping objects
            m = np.zeros((h, w), bool)
            y, x = rng.integers(0, h - 4), rng.integers(0, w - 4)
            m[y : y + rng.integers(2, 12), x : x + rng.integers(2, 12)] = True
            masks.append(m)
            pclasses.append(int(rng.integers(0, classes)))
            scores.append(float(rng.random()))
        crowd = frozenset(present[:1]) if rng.random() < 0.3 else frozenset()
        truths.append(ImageTruth(f"img{i}", instances, {k: v for k, v in labels.items() if k in present}, crowd))
        preds.append(
            ImagePrediction(
                f"img{i}",
                np.array(masks, bool).reshape(len(masks), h, w),
                np.array(pclasses, np.int64),
                np.array(scores),
            )
        )
    return truths, preds, [f"c{k}" for k in range(classes)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_faster_coco_eval(seed):
    fce = pytest.importorskip("faster_coco_eval")
    truths, preds, classes = _random_case(seed)
    out = evaluate(truths, preds, classes, max_dets=100)
    gt = coco_ground_truth(truths, classes)
    ids = {img["id"]: n for n, img in enumerate(gt["images"], 1)}  # int image ids for the second implementation
    gt["images"] = [{**img, "id": ids[img["id"]]} for img in gt["images"]]
    gt["annotations"] = [{**a, "image_id": ids[a["image_id"]]} for a in gt["annotations"]]
    results = [{**r, "image_id": ids[r["image_id"]]} for p in preds for r in coco_results(p, [1, 2, 3])]
    for kind in ("segm", "bbox"):
        # As in evaluate: mask results without boxes (area from the mask), box results without masks.
        drop = "bbox" if kind == "segm" else "segmentation"
        coco_gt = fce.COCO(gt, use_deepcopy=True)
        coco_dt = coco_gt.loadRes([{k: v for k, v in r.items() if k != drop} for r in results])
        ev = fce.COCOeval_faster(coco_gt, coco_dt, iouType=kind, print_function=lambda *a: None)
        ev.params.maxDets = [1, 10, 100]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
        for key, stat in zip(("map", "map_50", "map_75"), ev.stats[:3], strict=True):
            assert out[kind][key] == pytest.approx(float(stat), abs=1e-6), (kind, key)
        assert 0 < out[kind]["map"] < 1
    assert -1 not in list(_walk(out))


def test_evaluate_json_scores_predict_output():
    # The stage's numbers from predict's JSON (str image ids, as written) through the JSON round trip.
    truths, preds, classes = _random_case(5)
    out = evaluate(truths, preds, classes)
    gt = json.loads(json.dumps(coco_ground_truth(truths, classes)))
    results = json.loads(json.dumps([r for p in preds for r in coco_results(p, [1, 2, 3])]))
    scored = evaluate_json(gt, results)
    assert {k: scored[k] for k in ("segm", "bbox", "segm_per_class", "images")} == {
        k: out[k] for k in ("segm", "bbox", "segm_per_class", "images")
    }
    assert gt == json.loads(json.dumps(coco_ground_truth(truths, classes)))  # inputs are not modified
    with pytest.raises(ValueError):
        evaluate_json(gt, [{**results[0], "image_id": "nope"}])


def test_import_does_not_load_torch():
    code = "import sys, segflow.instance.metrics; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
