"""train: losses, model building and weights, one batch overfitted, the stage end to end."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from tasks import _model, augment, ingest, train
from tasks._common import SegflowError
from tasks._files import LIVE_DIR, MODEL_DIR
from tasks.params import IGNORE_INDEX, TrainParams

SMALL = TrainParams(encoder="resnet18", encoder_depth=3, decoder_channels=[16, 8, 4])


@pytest.mark.parametrize("name", ["ce", "dice", "focal", "lovasz", "dice_ce", "focal_dice"])
def test_losses_are_finite_and_ignore_the_ignore_label(name):
    loss = train.build_loss(name)
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 8, 8, requires_grad=True)
    target = torch.randint(0, 3, (2, 8, 8))
    value = loss(logits, target)
    assert torch.isfinite(value)
    value.backward()
    # Whatever the logits say at ignored pixels must not move the loss.
    target[:, :4] = IGNORE_INDEX
    changed = logits.detach().clone()
    changed[:, :, :4] = torch.randn(2, 3, 4, 8) * 10
    assert loss(logits.detach(), target) == pytest.approx(float(loss(changed, target)), rel=1e-5)


def test_real_small_model_overfits_one_batch():
    torch.manual_seed(0)
    model = _model.build(SMALL, num_classes=3)
    images = torch.randn(2, 3, 32, 32)
    targets = torch.zeros(2, 32, 32, dtype=torch.long)
    targets[:, 4:14, 4:20] = 1
    targets[:, 18:30, 10:28] = 2
    loss_fn = train.build_loss("dice_ce")
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for _ in range(60):
        loss = loss_fn(model(images), targets)
        first = first if first is not None else loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(images).argmax(1) == targets).float().mean()
    assert float(loss.detach()) < 0.25 * first
    assert accuracy > 0.95


def _small_card(classes: int, channels: int = 3, pad_divisor: int = 32) -> _model.ModelCard:
    """The card of a ``SMALL`` model with ``classes`` classes and ``channels`` input channels."""
    return _model.ModelCard(
        arch="Unet",
        encoder="resnet18",
        encoder_depth=3,
        decoder_channels=[16, 8, 4],
        classes=["bg", "a", "b", "c"][:classes],
        mean=[0.5] * channels,
        std=[0.2] * channels,
        in_channels=channels,
        pad_divisor=pad_divisor,
        train_size=32,
    )


def test_save_and_load_round_trip(tmp_path):
    torch.manual_seed(1)
    model = _model.build(SMALL, num_classes=4).eval()
    preprocess = tmp_path / "eval.json"
    preprocess.write_text("{}")
    card = _small_card(4)
    written = _model.save(model, card, preprocess, tmp_path / "model")
    loaded, loaded_card = _model.load(tmp_path / "model")
    assert loaded_card == written == card.model_copy(update={"weights_sha256": written.weights_sha256})
    assert len(written.weights_sha256) == 64
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert not (tmp_path / "model" / "model.safetensors").read_bytes().startswith(b"\x80"), "no pickle"
    # The same model saves to the same bytes, so DVC sees an unchanged output as unchanged.
    for attempt in range(3):
        _model.save(model, card, preprocess, tmp_path / f"again{attempt}")
        assert (tmp_path / f"again{attempt}" / "model.safetensors").read_bytes() == (
            tmp_path / "model" / "model.safetensors"
        ).read_bytes()


def test_a_changed_weights_file_is_refused(tmp_path):
    model = _model.build(SMALL, num_classes=2)
    preprocess = tmp_path / "eval.json"
    preprocess.write_text("{}")
    card = _small_card(2, channels=1)
    _model.save(model, card, preprocess, tmp_path / "model")
    weights = tmp_path / "model" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one bit of one weight
    weights.write_bytes(bytes(data))
    with pytest.raises(SegflowError, match=r"model.safetensors: its sha256 does not match .*model.json .*refusing"):
        _model.load(tmp_path / "model")


def test_onnx_export_is_checked_against_pytorch(tmp_path):
    pytest.importorskip("onnxruntime")
    model = _model.build(SMALL, num_classes=3)
    preprocess = tmp_path / "eval.json"
    preprocess.write_text("{}")
    card = _small_card(3, pad_divisor=8)
    written = _model.save(model, card, preprocess, tmp_path / "model", export=["onnx"])
    entry = written.exports["onnx"]
    assert entry["file"] == "model.onnx" and entry["max_abs_logit_diff"] < 1e-3
    assert _model.verify(tmp_path / "model", written, "onnx") == tmp_path / "model" / "model.onnx"


def test_local_encoder_weights_are_loaded(tmp_path):
    source = _model.build(SMALL, num_classes=2)
    weights = tmp_path / "encoder.safetensors"
    save_file({k: v.contiguous() for k, v in source.encoder.state_dict().items()}, weights)
    model = _model.build(SMALL.model_copy(update={"encoder_weights": str(weights)}), num_classes=2)
    for key, value in source.encoder.state_dict().items():
        assert torch.equal(model.encoder.state_dict()[key], value), key
    # A whole-model checkpoint (encoder.* keys) works too.
    whole = tmp_path / "whole.pth"
    torch.save(source.state_dict(), whole)
    model = _model.build(SMALL.model_copy(update={"encoder_weights": str(whole)}), num_classes=2)
    assert torch.equal(model.encoder.conv1.weight, source.encoder.conv1.weight)


def test_partly_fitting_weights_load_with_a_warning(tmp_path, caplog):
    source = _model.build(SMALL, num_classes=2)
    state = {k: v.contiguous() for k, v in source.encoder.state_dict().items() if k.startswith("conv1")}
    state["bn1.weight"] = torch.zeros(5)  # wrong shape
    weights = tmp_path / "part.safetensors"
    save_file(state, weights)
    model = _model.build(SMALL.model_copy(update={"encoder_weights": str(weights)}), num_classes=2)
    assert torch.equal(model.encoder.conv1.weight, source.encoder.conv1.weight)
    assert "only 1 of the encoder's" in caplog.text and "1 shape mismatches" in caplog.text


def test_weight_problems_are_clear_errors(tmp_path):
    with pytest.raises(SegflowError, match="does not exist"):
        _model.build(SMALL.model_copy(update={"encoder_weights": str(tmp_path / "nope.pth")}), 2)
    with pytest.raises(SegflowError, match="set it to null for random initialisation"):
        _model.build(SMALL.model_copy(update={"encoder_weights": "imagenet"}), 2)  # hub, offline
    with pytest.raises(SegflowError, match=r"Wrong pretrained weights `imagnet`.*'imagenet'"):
        _model.build(SMALL.model_copy(update={"encoder_weights": "imagnet"}), 2)  # a typo, not the network
    alien = tmp_path / "alien.safetensors"
    save_file({"foo.weight": torch.zeros(3)}, alien)
    with pytest.raises(SegflowError, match="none of its 1 tensors fit"):
        _model.build(SMALL.model_copy(update={"encoder_weights": str(alien)}), 2)


def test_model_option_mistakes_are_clear_errors():
    with pytest.raises(SegflowError, match="unknown encoder 'resnet19'; did you mean resnet18"):
        _model.build(SMALL.model_copy(update={"encoder": "resnet19"}), 2)
    with pytest.raises(SegflowError, match="arch FPN has no such option"):
        _model.build(SMALL.model_copy(update={"arch": "FPN"}), 2)


def test_precision_auto_is_fp32_on_cpu_and_mixed_on_gpu(monkeypatch):
    assert train.resolve_precision("auto", "cpu") == "32-true"
    assert train.resolve_precision("16-mixed", "gpu") == "16-mixed"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert train.resolve_precision("auto", "auto") == "bf16-mixed"
    assert train.resolve_precision("auto", "cpu") == "32-true"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert train.resolve_precision("auto", "gpu") == "16-mixed"


def test_stage_run_writes_model_and_metrics(tiny_params, tiny_paths):
    ingest.run(tiny_params, tiny_paths)
    augment.run(tiny_params, tiny_paths)
    summary = train.run(tiny_params, tiny_paths)
    model_dir = tiny_paths.train / MODEL_DIR
    assert sorted(p.name for p in model_dir.iterdir()) == ["model.json", "model.safetensors", "preprocess.json"]
    card = _model.read_card(model_dir)
    assert card.classes == tiny_params.classes and card.encoder_depth == 3
    assert card.training["epochs"] == summary["epochs"] == 1
    assert 0.0 <= summary["best_val_iou_macro"] <= 1.0
    live = json.loads((tiny_paths.train / LIVE_DIR / "metrics.json").read_text())
    assert {"loss", "iou_macro", "dice_macro"} <= set(live["val"])
    assert (tiny_paths.train / LIVE_DIR / "plots" / "metrics" / "train" / "loss.tsv").is_file()
    model, _ = _model.load(model_dir)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 4, 32, 32)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_stage_trains_with_mixed_precision_on_gpu(tiny_params, tiny_paths):
    params = tiny_params.model_copy(
        update={"train": tiny_params.train.model_copy(update={"accelerator": "gpu", "precision": "auto"})}
    )
    ingest.run(params, tiny_paths)
    augment.run(params, tiny_paths)
    summary = train.run(params, tiny_paths)
    assert summary["precision"] in ("bf16-mixed", "16-mixed")


def test_stage_runs_in_a_git_repository_without_commits(tiny_params, tmp_path, monkeypatch):
    """A user's first `dvc repro` often comes before their first commit."""
    import subprocess

    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    monkeypatch.chdir(tmp_path)
    paths = tiny_params.paths.under(tmp_path)
    ingest.run(tiny_params, paths)
    augment.run(tiny_params, paths)
    train.run(tiny_params, paths)
    assert (paths.train / LIVE_DIR / "metrics.json").is_file()
    assert not (tmp_path / ".dvc").exists(), "training must not turn the user's repository into a DVC project"
