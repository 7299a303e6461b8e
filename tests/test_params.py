"""params.yaml is read by one typed loader that rejects mistakes by name."""

from __future__ import annotations

import re
import shutil

import pytest
import segmentation_models_pytorch as smp
import yaml

from segflow.errors import SegflowError
from segflow.params import Arch, Params, ParamsError, load_params, parse_params
from tests.conftest import ROOT


def test_project_params_file_is_valid_and_complete():
    params = load_params(ROOT / "params.yaml")
    written = yaml.safe_load((ROOT / "params.yaml").read_text())
    # Every section is written out in the file, so `dvc params diff` shows all of them.
    assert set(written) == set(Params.model_fields)
    assert params.classes[0] == "background"


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"trian": {}}, "unknown key 'trian'"),
        ({"train": {"lrr": 0.1}}, "unknown key 'train.lrr'"),
        ({"ingest": {"synthetic": {"num_image": 5}}}, "unknown key 'ingest.synthetic.num_image'"),
        ({"train": {"loss": "hinge"}}, "train.loss"),
        ({"train": {"arch": "UNet3D"}}, "train.arch"),
        ({"train": {"precision": "fp8"}}, "train.precision"),
        ({"train": {"lr": -1}}, "train.lr"),
        ({"train": {"encoder_depth": 4, "decoder_channels": [8, 8]}}, "decoder_channels has 2 entries"),
        ({"ingest": {"val_fraction": 0.5, "test_fraction": 0.5}}, "leave some data for training"),
        ({"classes": ["background"]}, "at least 2 classes"),
        ({"classes": ["a", "b", "a"]}, "repeat"),
        ({"ingest": {"synthetic": {"class_weights": [1, 2]}}}, "one per object class (3"),
        ({"ingest": {"synthetic": {"min_objects": 5, "max_objects": 2}}}, "min_objects"),
        ({"ingest": {"synthetic": {"class_weights": [1, -1, 1]}}}, "ingest.synthetic.class_weights.1"),
        ({"ingest": {"synthetic": {"class_weights": [0, 0, 0]}}}, "all zero"),
        ({"classes": ["bg", *"abcdefg"]}, "at most 6 object classes"),
        ({"augment": {"crop_size": 100}}, "augment.crop_size is 100, not a multiple of 32"),
        ({"train": {"encoder_depth": 3}, "augment": {"pad_divisor": 4}}, "augment.pad_divisor is 4"),
        ({"train": {"devices": 0}}, "train.devices"),
        ({"train": {"strategy": "ddp_spawn"}}, "train.strategy"),
        ({"train": {"monitor": "val/accuracy"}}, "train.monitor"),
        ({"evaluate": {"preview_samples": 0}}, "evaluate.preview_samples"),
        ({"register": {"export": ["onnx"]}}, "register.export moved to export.formats"),
        ({"export": {"formats": ["tflite"]}}, "export.formats.0"),
        ({"background": "sky"}, "background: 'sky' is not one of classes"),
        ({"train": {"class_weights": [1.0, 2.0]}}, "train.class_weights has 2 weights for 4 classes"),
    ],
)
def test_bad_params_are_rejected_by_name(data, expected):
    with pytest.raises(ParamsError) as info:
        parse_params(data, "params.yaml")
    message = str(info.value)
    assert expected in message
    assert "\n" not in message
    # A cross-key check names its keys; it does not dump the whole section it saw.
    assert "{'" not in message and "Value error" not in message


def test_all_problems_reported_at_once():
    with pytest.raises(ParamsError) as info:
        parse_params({"train": {"lrr": 1, "epochs": 0}})
    assert "train.lrr" in str(info.value) and "train.epochs" in str(info.value)


def test_file_errors_are_one_line(tmp_path):
    with pytest.raises(ParamsError) as info:
        load_params(tmp_path / "params.yaml")
    assert str(info.value).startswith(f"{tmp_path / 'params.yaml'}: not found; segflow reads params.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: 1\ntrain:\n  lr: 0.1\n   epochs: 3\n")
    with pytest.raises(ParamsError) as info:
        load_params(bad)
    # file:line:column of the problem, what it is, what to check
    assert str(info.value).startswith(f"{bad}:4:10: not valid YAML (mapping values are not allowed here)")
    assert "indentation" in str(info.value) and "\n" not in str(info.value)
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ParamsError, match=r"bad.yaml:2:1: not valid YAML") as info:
        load_params(bad)
    assert "\n" not in str(info.value)
    bad.write_text("- a\n- b\n")
    with pytest.raises(ParamsError, match="must be a mapping"):
        load_params(bad)


def test_encoder_weights_null_spellings_mean_random_init():
    for value in (None, "", "none", "null"):
        assert parse_params({"train": {"encoder_weights": value}}).train.encoder_weights is None


def test_arch_choices_match_smp():
    # If smp adds or renames an architecture, the Literal must follow.
    from segflow.semantic.archs import EXTRA_ARCHS

    assert {a.lower() for a in Arch.__args__} == set(smp.MODEL_ARCHITECTURES_MAPPING) | {a.lower() for a in EXTRA_ARCHS}


def test_synthetic_class_limit_matches_the_generator():
    from segflow.data import synthetic
    from segflow.params import SYNTHETIC_OBJECT_CLASSES

    assert SYNTHETIC_OBJECT_CLASSES == synthetic.MAX_OBJECT_CLASSES


def test_paths_reroot(tmp_path):
    paths = Params().paths.under(tmp_path)
    assert paths.train == tmp_path / "data" / "train"


@pytest.mark.parametrize("value", ["../outside", "/etc/segflow", ".", "data/../.."])
def test_outputs_must_stay_inside_the_project(tmp_path, value):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"paths": {"train": value}}))
    with pytest.raises(ParamsError, match=rf"paths.train: {re.escape(value)} is outside the project"):
        load_params(tmp_path / "params.yaml")


def test_outputs_may_not_leave_through_a_symbolic_link(tmp_path):
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    (project / "data").mkdir(parents=True)
    elsewhere.mkdir()
    (project / "data" / "out").symlink_to(elsewhere)
    (project / "params.yaml").write_text(yaml.safe_dump({"paths": {"evaluate": "data/out/evaluate"}}))
    with pytest.raises(ParamsError, match=r"paths\.evaluate: data/out/evaluate is outside the project"):
        load_params(project / "params.yaml")
    (project / "params.yaml").write_text(yaml.safe_dump({"paths": {"evaluate": str(project / "data/evaluate")}}))
    assert load_params(project / "params.yaml").paths.evaluate == project / "data/evaluate"


def test_a_ready_configuration_is_applied_keeping_comments_and_refused_whole_when_bad(tmp_path):
    from segflow.config import apply

    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    original = (tmp_path / "params.yaml").read_text()
    config = tmp_path / "em.yaml"
    config.write_text(
        "classes: [bg, disc, square, triangle]\nbackground: bg\naugment: {preset: microscopy}\n"
        "train: {epochs: 20, lr: 0.01}\n"
    )
    changed = apply(tmp_path, config)
    assert changed == ["classes", "background", "augment.preset", "train.lr"]  # epochs was already 20
    text = (tmp_path / "params.yaml").read_text()
    assert "classes: [bg, disc, square, triangle]" in text
    assert "# Every hyperparameter of the pipeline." in text and "# nightly at 02:00" in text  # comments kept
    params = load_params(tmp_path / "params.yaml")
    assert params.augment.preset == "microscopy" and params.train.lr == 0.01 and params.train.epochs == 20
    assert len(text.splitlines()) == len(original.splitlines())
    assert apply(tmp_path, config) == []  # applying twice changes nothing

    config.write_text("train: {lrr: 0.1}\n")
    with pytest.raises(SegflowError, match=r"unknown key 'train.lrr'"):
        apply(tmp_path, config)
    assert (tmp_path / "params.yaml").read_text() == text  # a bad configuration leaves params.yaml as it was
    assert not list(tmp_path.glob(".params.yaml.tmp-*"))


def test_the_shipped_configurations_are_valid(tmp_path):
    from segflow.config import apply

    for config in sorted((ROOT / "configs").glob("*.yaml")):
        shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
        assert apply(tmp_path, config), config
        load_params(tmp_path / "params.yaml")


def test_counts_have_sane_upper_bounds():
    with pytest.raises(ParamsError, match=r"train\.epochs") as info:
        parse_params({"train": {"epochs": 1_000_000_000}})
    assert "\n" not in str(info.value) and "10000" in str(info.value)


def test_a_yaml_alias_bomb_is_refused_in_one_line_before_it_expands(tmp_path):
    levels = ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    levels += [f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 10)}]" for i in range(8)]
    bomb = tmp_path / "params.yaml"
    bomb.write_text("\n".join(levels) + "\n")  # 10**9 values once expanded
    with pytest.raises(ParamsError) as info:
        load_params(bomb)
    assert str(info.value).startswith(f"{bomb}: its YAML aliases (*name) expand to more than 100000 values")
    # Ordinary aliases stay allowed.
    (tmp_path / "ok.yaml").write_text("seed: &s 3\ningest: {val_fraction: 0.2}\n")
    assert load_params(tmp_path / "ok.yaml").seed == 3


def test_binary_params_and_configuration_files_are_one_line(tmp_path):
    binary = tmp_path / "params.yaml"
    binary.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ParamsError) as info:
        load_params(binary)
    assert str(info.value) == f"{binary}: not a text file (UTF-8 YAML); restore it (git checkout -- params.yaml)"
    from segflow.config import apply

    (tmp_path / "project").mkdir()
    shutil.copy(ROOT / "params.yaml", tmp_path / "project" / "params.yaml")
    with pytest.raises(SegflowError) as info:
        apply(tmp_path / "project", binary)
    assert str(info.value) == f"{binary}: not a YAML text file; give a file of params like configs/*.yaml"
