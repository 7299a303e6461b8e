"""Every bad input is named on one line (on_bad: stop) or skipped and reported (skip); sources stay untouched."""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
import zipfile

import numpy as np
import pytest
import yaml

import tasks.ingest as ingest_stage
from bench._util import merge
from segflow.data import ingest
from segflow.data.checks import RULES, Problem
from segflow.errors import SegflowError
from segflow.layout import REPORT_JSON, REPORT_MD
from segflow.params import parse_params
from tests.datasets import paired, save, scene, tree_hashes

BASE = {"classes": ["background", "blob"], "ingest": {"source": "folder", "workers": 1}}


def _truncate(root):
    path = root / "images/img_005.png"
    path.write_bytes(path.read_bytes()[:60])
    return "images/img_005.png"


def _text_as_png(root):
    (root / "images/img_005.png").write_text("not a picture")
    return "images/img_005.png"


def _stray_file(root):
    (root / "images/notes.txt").write_text("scanned on tuesday")
    return "images/notes.txt"


def _size_mismatch(root):
    save(root / "masks/img_005.png", np.zeros((30, 40), np.uint8))
    return "masks/img_005.png"


def _bad_mask_value(root):
    _, mask = scene(0, 5)
    mask[0, :5] = 7
    save(root / "masks/img_005.png", mask)
    return "masks/img_005.png"


def _image_without_mask(root):
    (root / "masks/img_005.png").unlink()
    return "images/img_005.png"


def _mask_without_image(root):
    save(root / "masks/orphan.png", scene(0, 9)[1])
    return "masks/orphan.png"


def _too_many_pixels(root):
    image, mask = scene(5, 5, size=(80, 64))
    save(root / "images/img_005.png", image)
    save(root / "masks/img_005.png", mask)
    return "images/img_005.png"


def _symlink_out(root):
    outside = root.parent / "elsewhere.png"
    save(outside, scene(0, 7)[0])
    os.symlink(outside, root / "images/img_099.png")
    save(root / "masks/img_099.png", scene(0, 7)[1])
    return "images/img_099.png"


def _duplicate(root):
    shutil.copy(root / "images/img_001.png", root / "images/zz_copy_of_1.png")
    shutil.copy(root / "masks/img_001.png", root / "masks/zz_copy_of_1.png")
    return "images/zz_copy_of_1.png"


CASES = {
    "unreadable": (_truncate, {}),
    "not_an_image": (_text_as_png, {}),
    "stray_file": (_stray_file, {}),
    "size_mismatch": (_size_mismatch, {}),
    "bad_mask_value": (_bad_mask_value, {}),
    "image_without_mask": (_image_without_mask, {}),
    "mask_without_image": (_mask_without_image, {}),
    "too_many_pixels": (_too_many_pixels, {"max_pixels": 2000}),
    "symlink_escape": (_symlink_out, {}),
    "duplicate": (_duplicate, {}),
}
RULE_OF = {"stray_file": "not_an_image"}


def _dataset(tmp_path):
    root = tmp_path / "source" / "ds"
    paired(root, n=16)
    return root


def _stage(project, monkeypatch, capsys, keys):
    """Run ``python -m tasks.ingest``'s entry point in ``project``; return (exit code, stderr)."""
    project.mkdir(parents=True, exist_ok=True)
    (project / "params.yaml").write_text(yaml.safe_dump(merge(BASE, {"ingest": keys})))
    monkeypatch.chdir(project)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        ingest_stage.main()
    return exit_info.value.code, capsys.readouterr().err


@pytest.mark.parametrize("case", CASES)
def test_bad_input_stops_with_one_line_naming_the_file(tmp_path, monkeypatch, capsys, case):
    root = _dataset(tmp_path)
    make_bad, keys = CASES[case]
    bad_file = make_bad(root)
    before = tree_hashes(tmp_path / "source")
    code, err = _stage(tmp_path / "project", monkeypatch, capsys, {"path": str(root), **keys})
    assert code == 2
    line = err.strip()
    assert "\n" not in line, err
    assert line.startswith(f"segflow ingest: error: {root}/{bad_file}: "), line
    assert "Traceback" not in err
    assert tree_hashes(tmp_path / "source") == before, "the source folder is untouched"
    assert not (tmp_path / "project" / "data" / "ingest").exists(), "nothing half-written"
    assert not list((tmp_path / "project" / "data").iterdir()), "no scratch left behind"


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_skipped_and_reported(tmp_path, case):
    root = _dataset(tmp_path)
    make_bad, keys = CASES[case]
    bad_file = make_bad(root)
    before = tree_hashes(tmp_path / "source")
    params = parse_params(merge(BASE, {"ingest": {"path": str(root), "on_bad": "skip", **keys}}))
    paths = params.paths.under(tmp_path / "project")
    manifest = ingest.run(params, paths)
    report = json.loads((paths.ingest / REPORT_JSON).read_text())
    problem = report["problems"][0]
    assert problem["file"] == f"{root}/{bad_file}"
    assert problem["rule"] == RULE_OF.get(case, case) and problem["action"] == "skipped"
    # A refused link leaves its mask without an image: that is listed too.
    assert [p["rule"] for p in report["problems"][1:]] == (["mask_without_image"] if case == "symlink_escape" else [])
    assert report["skipped"] == len(report["problems"])
    assert f"{root}/{bad_file}" not in set(manifest["source_image"]) | set(manifest["source_mask"])
    # Cases that add a bad file keep all 16 good pairs; the others spoil one of them.
    assert len(manifest) == 15 + (case in {"mask_without_image", "stray_file", "duplicate", "symlink_escape"})
    assert "## Problems" in (paths.ingest / REPORT_MD).read_text()
    assert tree_hashes(tmp_path / "source") == before


def test_several_problems_are_all_listed(tmp_path):
    root = _dataset(tmp_path)
    bad = {_truncate(root), _mask_without_image(root), _duplicate(root)}
    params = parse_params(merge(BASE, {"ingest": {"path": str(root), "on_bad": "skip"}}))
    paths = params.paths.under(tmp_path / "project")
    manifest = ingest.run(params, paths)
    report = json.loads((paths.ingest / REPORT_JSON).read_text())
    assert {p["file"] for p in report["problems"]} == {f"{root}/{name}" for name in bad}
    assert len(manifest) == 15


def test_empty_dataset(tmp_path, monkeypatch, capsys):
    root = tmp_path / "source" / "ds"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    code, err = _stage(tmp_path / "project", monkeypatch, capsys, {"path": str(root), "on_bad": "skip"})
    assert code == 2
    assert err.strip() == (
        f"segflow ingest: error: {root}: holds no image/mask pairs (looked for images/ and masks/); "
        "check ingest.path and ingest.layout"
    )


def test_missing_source_and_missing_layout_folders(tmp_path, monkeypatch, capsys):
    code, err = _stage(tmp_path / "project", monkeypatch, capsys, {"path": str(tmp_path / "nowhere")})
    assert code == 2 and "ingest.path:" in err and "does not exist" in err and "\n" not in err.strip()
    (tmp_path / "ds" / "pictures").mkdir(parents=True)
    code, err = _stage(tmp_path / "project", monkeypatch, capsys, {"path": str(tmp_path / "ds")})
    assert code == 2 and "no images/ or masks/ folder" in err


def _zip_with(root, dest, extra: dict[str, bytes]):
    with zipfile.ZipFile(dest, "w") as zf:
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            zf.write(path, str(path.relative_to(root)))
        for name, data in extra.items():
            zf.writestr(name, data)


def test_zip_slip_member_is_refused(tmp_path, monkeypatch, capsys):
    root = _dataset(tmp_path)
    archive = tmp_path / "source" / "ds.zip"
    _zip_with(root, archive, {"../../evil.png": b"payload", "/abs/evil.png": b"payload"})
    before = tree_hashes(tmp_path / "source")
    code, err = _stage(tmp_path / "project", monkeypatch, capsys, {"path": str(archive)})
    assert code == 2
    assert err.strip().startswith(f"segflow ingest: error: {archive}:../../evil.png: would be written outside")
    params = parse_params(merge(BASE, {"ingest": {"path": str(archive), "on_bad": "skip"}}))
    paths = params.paths.under(tmp_path / "project2")
    manifest = ingest.run(params, paths)
    report = json.loads((paths.ingest / REPORT_JSON).read_text())
    assert [p["rule"] for p in report["problems"]] == ["archive_escape", "archive_escape"]
    assert len(manifest) == 16
    assert not list(tmp_path.rglob("evil.png")), "nothing written outside"
    assert tree_hashes(tmp_path / "source") == before


def test_tar_link_out_of_the_archive_is_refused(tmp_path):
    root = _dataset(tmp_path)
    archive = tmp_path / "source" / "ds.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(root, "ds")
        link = tarfile.TarInfo("ds/images/img_100.png")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(link)
        data = io.BytesIO(b"x")
        outside = tarfile.TarInfo("../outside.txt")
        outside.size = 1
        tf.addfile(outside, data)
    params = parse_params(merge(BASE, {"ingest": {"path": str(archive), "on_bad": "skip"}}))
    paths = params.paths.under(tmp_path / "project")
    ingest.run(params, paths)
    problems = json.loads((paths.ingest / REPORT_JSON).read_text())["problems"]
    assert {p["file"] for p in problems} == {f"{archive}:ds/images/img_100.png", f"{archive}:../outside.txt"}
    assert not (tmp_path / "outside.txt").exists()


def test_duplicates_never_straddle_splits(tmp_path):
    root = tmp_path / "ds"
    paired(root, n=30)
    for i in range(30):  # every image twice, under another name
        shutil.copy(root / f"images/img_{i:03d}.png", root / f"images/twin_{i:03d}.png")
        shutil.copy(root / f"masks/img_{i:03d}.png", root / f"masks/twin_{i:03d}.png")
    params = parse_params(merge(BASE, {"ingest": {"path": str(root), "on_bad": "skip"}}))
    manifest = ingest.run(params, params.paths.under(tmp_path / "p"))
    assert len(manifest) == 30
    assert manifest.groupby("sha256_pixels")["split"].nunique().max() == 1
    report = json.loads((tmp_path / "p/data/ingest" / REPORT_JSON).read_text())
    assert len(report["problems"]) == 30
    assert any("the other is in" in p["message"] for p in report["problems"]), "straddles are named"


def test_every_rule_has_a_message_that_names_a_fix():
    for rule, template in RULES.items():
        assert ";" in template, f"rule {rule} says what is wrong and what to do"
    with pytest.raises(KeyError):
        Problem("no_such_rule", "x")


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_an_archive_member_that_inflates_far_beyond_image_data_is_refused_before_extraction(tmp_path, kind):
    from segflow.data import archive as archives

    root = _dataset(tmp_path)
    source = tmp_path / "source" / f"ds.{kind}"
    bomb = b"\0" * (40 << 20)  # 40 MiB of zeros: a few tens of KiB packed (images do not compress 100x)
    if kind == "zip":
        _zip_with(root, source, {})
        with zipfile.ZipFile(source, "a") as zf:
            zf.writestr("ds/images/huge.png", bomb, compress_type=zipfile.ZIP_DEFLATED)
    else:
        with tarfile.open(source, "w:gz") as tf:
            tf.add(root, "ds")
            info = tarfile.TarInfo("ds/images/huge.png")
            info.size = len(bomb)
            tf.addfile(info, io.BytesIO(bomb))
    before = tree_hashes(tmp_path / "source")
    dest = tmp_path / "unpacked"
    dest.mkdir()
    with pytest.raises(SegflowError) as refused:
        archives.extract(source, dest, "ds")
    message = str(refused.value)
    assert "\n" not in message and "refusing to extract it (a zip bomb?)" in message
    assert message.startswith("ds:ds/images/huge.png: inflates " if kind == "zip" else "ds:(all members): inflates ")
    assert not any(dest.rglob("*")), "nothing written"
    assert tree_hashes(tmp_path / "source") == before
