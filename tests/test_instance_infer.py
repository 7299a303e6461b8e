"""Instance inference in tiles: each object once, whole, wherever the seams fall (a perfect stub detector)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from segflow.instance.infer import Instances, Predictor, _cut, tile_starts


def scene(size: int, seed: int) -> np.ndarray:
    """(size, size) uint16 ids: squares and discs of 6-14 px, apart from each other."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((size, size), dtype=np.uint16)
    yy, xx = np.mgrid[:size, :size]
    n = 0
    for _ in range(400):
        r = int(rng.integers(3, 7))
        cy, cx = rng.integers(r, size - r, size=2)
        region = (
            (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
            if rng.random() < 0.5
            else ((abs(yy - cy) <= r) & (abs(xx - cx) <= r))
        )
        grown = np.zeros_like(region)
        grown[max(0, cy - r - 2) : cy + r + 3, max(0, cx - r - 2) : cx + r + 3] = True
        if ids[grown].any():
            continue
        n += 1
        ids[region] = n
    return ids


class PerfectTiles(Predictor):
    """Finds exactly the objects visible in each tile it is given (cut by the tile edge where they are)."""

    def __init__(self, truth: np.ndarray, tile: int, overlap: int):
        self.truth, self.tile_size, self.overlap, self.merge_iou, self.max_detections = truth, tile, overlap, 0.5, 10**6
        self.calls = []

    def __call__(self, images):
        (tile,) = images
        y, x = int(tile[0, 0, 0]), int(tile[0, 0, 1])  # the tile's origin, written into its pixels
        self.calls.append((y, x))
        ids = self.truth[y : y + tile.shape[0], x : x + tile.shape[1]]
        present = [int(i) for i in np.unique(ids) if i]
        masks = np.stack([ids == i for i in present]) if present else np.zeros((0, *ids.shape), dtype=bool)
        output = {
            "masks": torch.from_numpy(masks[:, None].astype(np.float32)),
            "labels": torch.ones(len(present), dtype=torch.int64),
            "scores": torch.linspace(0.99, 0.5, max(1, len(present)))[: len(present)],
        }
        return [_cut(output, ids.shape[0], ids.shape[1], 0.5)]


@pytest.mark.parametrize(("size", "tile", "overlap"), [(200, 64, 32), (256, 96, 40), (130, 64, 32)])
def test_tiles_return_each_object_once_and_whole(size, tile, overlap):
    truth = scene(size, seed=size)
    predictor = PerfectTiles(truth, tile, overlap)
    image = np.zeros((size, size, 3), dtype=np.uint8)
    for y in tile_starts(size, tile, overlap):
        for x in tile_starts(size, tile, overlap):
            image[y, x] = (y, x, 0) if max(y, x) < 256 else (0, 0, 0)
    found = predictor.predict(image)
    assert len(predictor.calls) == len(tile_starts(size, tile, overlap)) ** 2 > 1
    wanted = {int(i) for i in np.unique(truth) if i}
    assert len(found.scores) == len(wanted)  # once each: no duplicates from two tiles, none lost at a seam
    for mask in found.masks:
        ids = np.unique(truth[mask])
        assert len(ids) == 1 and ids[0] > 0
        np.testing.assert_array_equal(mask, truth == ids[0])  # whole, not the part one tile saw


def test_tile_starts_cover_the_side_with_the_overlap():
    assert tile_starts(64, 64, 16) == [0]
    starts = tile_starts(200, 64, 32)
    assert starts[0] == 0 and starts[-1] == 200 - 64
    assert all(b - a <= 64 - 32 for a, b in itertools.pairwise(starts))


def test_id_image_paints_the_better_score_on_top():
    masks = np.zeros((2, 4, 4), dtype=bool)
    masks[0, :2] = True
    masks[1, 1:3] = True
    found = Instances.from_masks(masks, np.array([0, 0]), np.array([0.9, 0.6]))
    ids = found.id_image()
    assert ids[1].tolist() == [1, 1, 1, 1] and ids[2].tolist() == [2, 2, 2, 2] and ids[3].tolist() == [0] * 4
    assert found.id_image(min_score=0.7)[2].tolist() == [0] * 4


class _Echo(torch.nn.Module):
    """A stand-in detector: returns what it is told to, as Mask R-CNN's eval-mode output."""

    def __init__(self, outputs):
        super().__init__()
        self.outputs = outputs

    def forward(self, images):
        return self.outputs


def test_validation_scores_mask_ap_beyond_100_objects():
    # 150 objects in one image, all found: COCO AP 1.0 with val_detections 200 (torchmetrics' reading of
    # pycocotools' summary gives -1 for the AP at any limit but 100, which would pick the wrong epoch).
    from segflow.instance.module import InstanceModule
    from segflow.params import InstanceTrainParams

    ids = np.zeros((60, 150), dtype=np.uint16)
    for n in range(150):
        y, x = divmod(n, 30)
        ids[y * 12 : y * 12 + 8, x * 5 : x * 5 + 4] = n + 1
    masks = torch.from_numpy(np.stack([ids == n + 1 for n in range(150)]))
    target = {"masks": masks.to(torch.uint8), "labels": torch.ones(150, dtype=torch.int64)}
    output = {
        "masks": masks[:, None].float(),
        "labels": torch.ones(150, dtype=torch.int64),
        "scores": torch.linspace(0.99, 0.6, 150),
    }
    module = InstanceModule(_Echo([output]), InstanceTrainParams(val_detections=200), ["thing"], 0.5)
    logged = {}
    module.log_dict = lambda values, **_: logged.update(values)
    module.on_validation_epoch_start()
    module.validation_step(([torch.zeros(3, 60, 150)], [target], [0]), 0)
    module.on_validation_epoch_end()
    assert logged["val/segm_map"] == pytest.approx(1.0) and logged["val/segm_map_50"] == pytest.approx(1.0)


def test_local_torchvision_weights_load_whole_or_as_the_backbone(tmp_path):
    from torchvision.models import resnet18

    from segflow.errors import SegflowError
    from segflow.instance.model import build, load_weights

    def model():
        return build("resnet18", 2, 64, mean=[0.0] * 3, std=[1.0] * 3, width=32)

    trained = model()
    torch.save(trained.state_dict(), tmp_path / "whole.pth")
    fresh = model()
    assert load_weights(fresh, tmp_path / "whole.pth") == "the whole model"
    assert all(
        torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), trained.state_dict().values(), strict=True)
    )

    classifier = resnet18(weights=None)  # a classification network's file, as torchvision saves it
    torch.save(classifier.state_dict(), tmp_path / "resnet18.pth")
    fresh = model()
    assert load_weights(fresh, tmp_path / "resnet18.pth").startswith("the backbone (")
    assert torch.equal(fresh.backbone.body.conv1.weight, classifier.conv1.weight)

    with pytest.raises(SegflowError, match=r"not found; give a local"):
        load_weights(model(), tmp_path / "missing.pth")


def test_instances_hold_boxes_and_crops_not_image_sized_masks():
    """A slide's objects cost their boxes: each crop is its tight box, the full mask made when asked."""
    masks = np.zeros((3, 300, 400), dtype=bool)
    masks[0, 10:20, 30:45] = True
    masks[1, 250:300, 390:400] = True  # at the corner
    masks[1, 260, 380] = True
    found = Instances.from_masks(masks, np.array([0, 1, 0]), np.array([0.9, 0.8, 0.7]))
    assert len(found.scores) == 2  # the empty third mask is dropped
    assert found.boxes.tolist() == [[30, 10, 45, 20], [380, 250, 400, 300]]
    assert [c.shape for c in found.crops] == [(10, 15), (50, 20)]
    assert sum(c.size for c in found.crops) < masks[0].size // 100
    stack = found.masks
    assert stack.shape == (2, 300, 400) and len(stack) == 2
    np.testing.assert_array_equal(stack[1], masks[1])
    np.testing.assert_array_equal(np.asarray(stack), masks[:2])
    np.testing.assert_array_equal([m.sum() for m in stack], [150, 501])
    assert found.id_image()[260, 380] == 2
