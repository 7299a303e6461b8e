"""train: losses, model building and weights, one batch overfitted, the stage end to end."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from segflow import augment
from segflow.data import ingest
from segflow.errors import SegflowError
from segflow.layout import EVAL_PIPELINE, LIVE_DIR, MODEL_DIR, TRAIN_PIPELINE, load_transform, read_manifest, split_rows
from segflow.params import IGNORE_INDEX, TrainParams, available_cores
from segflow.semantic import export, factory, losses, store, train
from segflow.semantic.card import ModelCard, read_card
from segflow.semantic.dataset import SegmentationDataset
from segflow.semantic.module import SegmentationModule
from segflow.training import hardware

SMALL = TrainParams(encoder="resnet18", encoder_depth=3, decoder_channels=[16, 8, 4])


@pytest.mark.parametrize("name", ["ce", "dice", "focal", "lovasz", "dice_ce", "focal_dice"])
def test_losses_are_finite_and_ignore_the_ignore_label(name):
    loss = losses.build_loss(name)
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
    model = factory.build(SMALL, num_classes=3)
    images = torch.randn(2, 3, 32, 32)
    targets = torch.zeros(2, 32, 32, dtype=torch.long)
    targets[:, 4:14, 4:20] = 1
    targets[:, 18:30, 10:28] = 2
    loss_fn = losses.build_loss("dice_ce")
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


def _small_card(classes: int, channels: int = 3, pad_divisor: int = 32) -> ModelCard:
    """The card of a ``SMALL`` model with ``classes`` classes and ``channels`` input channels."""
    return ModelCard(
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
    model = factory.build(SMALL, num_classes=4).eval()
    preprocess = tmp_path / "eval.json"
    preprocess.write_text("{}")
    card = _small_card(4)
    written = store.save(model, card, preprocess, tmp_path / "model")
    loaded, loaded_card = store.load(tmp_path / "model")
    assert loaded_card == written == card.model_copy(update={"weights_sha256": written.weights_sha256})
    assert len(written.weights_sha256) == 64
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert not (tmp_path / "model" / "model.safetensors").read_bytes().startswith(b"\x80"), "no pickle"
    # The same model saves to the same bytes, so DVC sees an unchanged output as unchanged.
    for attempt in range(3):
        store.save(model, card, preprocess, tmp_path / f"again{attempt}")
        assert (tmp_path / f"again{attempt}" / "model.safetensors").read_bytes() == (
            tmp_path / "model" / "model.safetensors"
        ).read_bytes()


def test_a_changed_weights_file_is_refused(tmp_path):
    model = factory.build(SMALL, num_classes=2)
    preprocess = tmp_path / "eval.json"
    preprocess.write_text("{}")
    card = _small_card(2, channels=1)
    store.save(model, card, preprocess, tmp_path / "model")
    weights = tmp_path / "model" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one bit of one weight
    weights.write_bytes(bytes(data))
    with pytest.raises(SegflowError, match=r"model.safetensors: its sha256 does not match .*model.json .*refusing"):
        store.load(tmp_path / "model")


def test_onnx_export_is_checked_against_pytorch(tmp_path):
    pytest.importorskip("onnxruntime")
    model = factory.build(SMALL, num_classes=3)
    preprocess = tmp_path / "eval.json"
    preprocess.write_text("{}")
    card = _small_card(3, pad_divisor=8)
    saved = store.save(model, card, preprocess, tmp_path / "model")
    written = export.write(tmp_path / "model", tmp_path / "export", ["onnx"])
    entry = written.exports["onnx"]
    assert entry["file"] == "model.onnx" and entry["max_abs_logit_diff"] < 1e-3
    assert written.weights_sha256 == saved.weights_sha256, "the export folder names the weights it came from"
    assert store.verify(tmp_path / "export", written, "onnx") == tmp_path / "export" / "model.onnx"
    with pytest.raises(SegflowError, match=r"no onnx export; add onnx to export\.formats"):
        store.verify(tmp_path / "model", saved, "onnx")


def test_local_encoder_weights_are_loaded(tmp_path):
    source = factory.build(SMALL, num_classes=2)
    weights = tmp_path / "encoder.safetensors"
    save_file({k: v.contiguous() for k, v in source.encoder.state_dict().items()}, weights)
    model = factory.build(SMALL.model_copy(update={"encoder_weights": str(weights)}), num_classes=2)
    for key, value in source.encoder.state_dict().items():
        assert torch.equal(model.encoder.state_dict()[key], value), key
    # A whole-model checkpoint (encoder.* keys) works too.
    whole = tmp_path / "whole.pth"
    torch.save(source.state_dict(), whole)
    model = factory.build(SMALL.model_copy(update={"encoder_weights": str(whole)}), num_classes=2)
    assert torch.equal(model.encoder.conv1.weight, source.encoder.conv1.weight)


def test_partly_fitting_weights_load_with_a_warning(tmp_path, caplog):
    source = factory.build(SMALL, num_classes=2)
    state = {k: v.contiguous() for k, v in source.encoder.state_dict().items() if k.startswith("conv1")}
    state["bn1.weight"] = torch.zeros(5)  # wrong shape
    weights = tmp_path / "part.safetensors"
    save_file(state, weights)
    model = factory.build(SMALL.model_copy(update={"encoder_weights": str(weights)}), num_classes=2)
    assert torch.equal(model.encoder.conv1.weight, source.encoder.conv1.weight)
    assert "only 1 of the encoder's" in caplog.text and "1 shape mismatches" in caplog.text


def test_weight_problems_are_clear_errors(tmp_path):
    with pytest.raises(SegflowError, match="does not exist"):
        factory.build(SMALL.model_copy(update={"encoder_weights": str(tmp_path / "nope.pth")}), 2)
    with pytest.raises(SegflowError, match="set it to null for random initialisation"):
        factory.build(SMALL.model_copy(update={"encoder_weights": "imagenet"}), 2)  # hub, offline
    with pytest.raises(SegflowError, match=r"Wrong pretrained weights `imagnet`.*'imagenet'"):
        factory.build(SMALL.model_copy(update={"encoder_weights": "imagnet"}), 2)  # a typo, not the network
    alien = tmp_path / "alien.safetensors"
    save_file({"foo.weight": torch.zeros(3)}, alien)
    with pytest.raises(SegflowError, match="none of its 1 tensors fit"):
        factory.build(SMALL.model_copy(update={"encoder_weights": str(alien)}), 2)


def test_model_option_mistakes_are_clear_errors():
    with pytest.raises(SegflowError, match="unknown encoder 'resnet19'; did you mean resnet18"):
        factory.build(SMALL.model_copy(update={"encoder": "resnet19"}), 2)
    with pytest.raises(SegflowError, match="arch FPN has no such option"):
        factory.build(SMALL.model_copy(update={"arch": "FPN"}), 2)


def test_precision_auto_is_fp32_on_cpu_and_mixed_on_gpu(monkeypatch):
    assert hardware.resolve_precision("auto", "cpu") == "32-true"
    assert hardware.resolve_precision("16-mixed", "gpu") == "16-mixed"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert hardware.resolve_precision("auto", "auto") == "bf16-mixed"
    assert hardware.resolve_precision("auto", "cpu") == "32-true"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert hardware.resolve_precision("auto", "gpu") == "16-mixed"


def test_bf16_on_a_cpu_that_must_emulate_it_is_kept_but_warned_about(monkeypatch, caplog):
    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: True)
    with caplog.at_level("WARNING", logger=hardware.__name__):
        assert hardware.resolve_precision("bf16-mixed", "cpu") == "bf16-mixed"
    assert not caplog.records
    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: False)
    with caplog.at_level("WARNING", logger=hardware.__name__):
        assert hardware.resolve_precision("bf16-mixed", "cpu") == "bf16-mixed"
    (record,) = caplog.records
    assert "without native bf16" in record.getMessage() and "train.precision: auto" in record.getMessage()


def test_channels_last_auto_follows_the_gpu_and_bf16_on_the_cpu():
    auto = SMALL.model_copy(update={"channels_last": "auto"})
    assert auto.use_channels_last(True) and auto.use_channels_last(True, "32-true")
    assert not auto.use_channels_last(False, "32-true")
    assert auto.use_channels_last(False, "bf16-mixed")
    assert not SMALL.model_copy(update={"channels_last": False}).use_channels_last(False, "bf16-mixed")
    assert SMALL.model_copy(update={"channels_last": True}).use_channels_last(False, "32-true")


def test_stage_run_writes_model_and_metrics(tiny_params, tiny_paths, prepared):
    summary = train.run(tiny_params, tiny_paths)
    model_dir = tiny_paths.train / MODEL_DIR
    assert sorted(p.name for p in model_dir.iterdir()) == ["model.json", "model.safetensors", "preprocess.json"]
    card = read_card(model_dir)
    assert card.classes == tiny_params.classes and card.encoder_depth == 3
    assert card.training["epochs"] == summary["epochs"] == 1
    assert 0.0 <= summary["best_val_iou_macro"] <= 1.0
    live = json.loads((tiny_paths.train / LIVE_DIR / "metrics.json").read_text())
    assert {"loss", "iou_macro", "dice_macro"} <= set(live["val"])
    assert live["epoch"] == summary["epochs"] == 1, "the summary counts epochs as the log does (epoch 1/1)"
    assert (tiny_paths.train / LIVE_DIR / "plots" / "metrics" / "train" / "loss.tsv").is_file()
    # The data path's figures, per epoch, beside the losses.
    perf = live["perf"]
    assert 0.0 <= perf["data_wait_share"] <= 1.0
    assert perf["images_per_s"] > 0 and perf["peak_rss_mb"] > 0 and perf["validation_s"] > 0
    assert perf["startup_s"] > 0 and perf["first_step_s"] > 0
    waits = (tiny_paths.train / LIVE_DIR / "plots" / "metrics" / "perf" / "data_wait_share.tsv").read_text()
    assert len(waits.splitlines()) == 1 + summary["epochs"]  # header, one row per epoch
    model, _ = store.load(model_dir)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 4, 32, 32)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_stage_trains_with_mixed_precision_on_gpu(tiny_params, tiny_paths, prepared):
    params = tiny_params.model_copy(
        update={"train": tiny_params.train.model_copy(update={"accelerator": "gpu", "precision": "auto"})}
    )
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


# --- speed: the data path and the device settings ----------------------------------------------


@pytest.mark.parametrize(
    ("setting", "gpu", "cores", "expected"),
    [
        ("auto", True, 16, 8),  # a GPU node: feed it, at most 8 per device
        ("auto", True, 4, 3),  # one core left for the training loop
        ("auto", True, 1, 0),
        ("auto", False, 2, 0),  # CPU training: the model already uses every core
        ("auto", False, 32, 8),
        (3, False, 2, 3),  # an explicit count is kept
    ],
)
def test_num_workers_auto_resolves_from_the_device_and_the_cores(setting, gpu, cores, expected):
    assert SMALL.model_copy(update={"num_workers": setting}).resolved_workers(gpu, cores) == expected


def test_num_workers_auto_is_the_default_and_counts_this_machine():
    params = TrainParams()
    assert params.num_workers == "auto"
    assert (0 <= params.resolved_workers(True) <= 8 and params.resolved_workers(True) < available_cores()) or (
        available_cores() == 1 and params.resolved_workers(True) == 0
    )


@pytest.fixture
def tiny_sets(tiny_params, tiny_paths, prepared):
    """The tiny project's training and validation datasets, as the stage builds them."""
    rows = read_manifest(tiny_paths.ingest)
    make = lambda split, name, seed: SegmentationDataset(  # noqa: E731
        tiny_paths.ingest, split_rows(rows, split), load_transform(tiny_paths.augment / name, seed)
    )
    return make("train", TRAIN_PIPELINE, tiny_params.seed), make("val", EVAL_PIPELINE, None)


def _epochs_of_batches(dataset, workers: int, epochs: int = 2) -> list[list[torch.Tensor]]:
    loader = train._loader(dataset, SMALL.model_copy(update={"batch_size": 4}), 7, workers, train=True)
    seen = []
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)  # as Lightning does before each epoch
        seen.append([torch.cat([images.flatten(), masks.flatten().float()]) for images, masks, _ in loader])
    return seen


def test_two_workers_give_the_same_batches_as_one_for_the_same_seed(tiny_sets):
    train_set, _ = tiny_sets
    one, two = _epochs_of_batches(train_set, 1), _epochs_of_batches(train_set, 2)
    assert len(one[0]) == len(two[0]) > 1
    for epoch_one, epoch_two in zip(one, two, strict=True):
        for a, b in zip(epoch_one, epoch_two, strict=True):
            assert torch.equal(a, b)
    # ... while each epoch draws new crops and a new order (the augmentation is not frozen).
    assert not all(torch.equal(a, b) for a, b in zip(one[0], one[1], strict=True))


def test_cached_samples_equal_decoded_ones_and_the_budget_is_kept(tiny_sets):
    train_set, val_set = tiny_sets
    fresh = [val_set[i] for i in range(len(val_set))]
    assert not val_set.preload(budget_bytes=val_set.decoded_bytes() - 1)  # over budget: left on disk
    assert val_set.preload(budget_bytes=val_set.decoded_bytes(), threads=2)
    for (image, mask, _), (cached_image, cached_mask, _) in zip(fresh, val_set, strict=True):
        assert torch.equal(image, cached_image) and torch.equal(mask, cached_mask)
    # A training sample's augmentation follows its seed alone, cached or not.
    key = (3, 12345)
    before = train_set[key]
    assert train_set.preload(budget_bytes=2**30)
    assert all(torch.equal(a, b) for a, b in zip(before[:2], train_set[key][:2], strict=True))


def test_channels_last_and_compile_are_applied_to_the_model():
    module = SegmentationModule(
        factory.build(SMALL, num_classes=2), SMALL, ["a", "b"], channels_last=True, compile=True
    )
    convs = [m for m in module.model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    assert isinstance(module.net, torch._dynamo.eval_frame.OptimizedModule)
    assert module.net._orig_mod is module.model  # the plain model is what is saved
    assert not any("_orig_mod" in key for key in module.state_dict())
    images, *_ = module.on_after_batch_transfer((torch.randn(2, 3, 32, 32), None, None), 0)
    assert images.is_contiguous(memory_format=torch.channels_last)
    plain = SegmentationModule(factory.build(SMALL, num_classes=2), SMALL, ["a", "b"])
    assert plain.net is plain.model and not plain.channels_last
    assert plain.model.encoder.conv1.weight.is_contiguous()


def test_stage_trains_in_channels_last_with_sgd_clipping_accumulation_and_saves_a_plain_model(
    tiny_params, tiny_paths, prepared, caplog
):
    """The non-default paths in one stage run: channels_last, no cache, SGD + poly, clipping, accumulation."""
    update = {
        "channels_last": True,
        "cache_mb": 0,
        "optimizer": "sgd",
        "schedule": "poly",
        "grad_clip": 1.0,
        "accumulate": 2,
        "lr": 0.01,
    }
    params = tiny_params.model_copy(update={"train": tiny_params.train.model_copy(update=update)})
    with caplog.at_level("INFO", logger="segflow"):
        summary = train.run(params, tiny_paths)
    assert "channels_last" in caplog.text and "decoded every epoch (train.cache_mb is 0)" in caplog.text
    assert summary["epochs"] == 1
    model, _ = store.load(tiny_paths.train / MODEL_DIR)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 4, 32, 32)


def test_a_bf16_stage_on_the_cpu_turns_channels_last_on_and_saves_an_fp32_model(
    tiny_params, tiny_paths, prepared, caplog
):
    """What the ISBI and CamVid recipes run: bf16 mixed precision on the CPU, channels_last left on auto."""
    update = {"precision": "bf16-mixed", "channels_last": "auto", "accelerator": "cpu"}
    params = tiny_params.model_copy(update={"train": tiny_params.train.model_copy(update=update)})
    with caplog.at_level("INFO", logger="segflow"):
        summary = train.run(params, tiny_paths)
    assert "bf16-mixed, channels_last" in caplog.text
    assert summary["precision"] == "bf16-mixed"
    model, _ = store.load(tiny_paths.train / MODEL_DIR)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # inference stays fp32
    card = json.loads((tiny_paths.train / MODEL_DIR / "model.json").read_text())
    assert card["training"]["precision"] == "bf16-mixed"


# --- class weights ------------------------------------------------------------------------------

# Labelled pixels of three training images (and one val image, left out), classes bg / a / b:
#   bg: 200 px in all three images (300 px)  -> freq 2/3
#   a:   65 px in images 1 and 3 (200 px)    -> freq 0.325 (the median)
#   b:   35 px in images 2 and 3 (200 px)    -> freq 0.175
HAND_MADE = [
    {"id": "i1", "split": "train", "px_bg": 60, "px_a": 40, "px_b": 0, "px_ignored": 7},
    {"id": "i2", "split": "train", "px_bg": 90, "px_a": 0, "px_b": 10, "px_ignored": 0},
    {"id": "i3", "split": "train", "px_bg": 50, "px_a": 25, "px_b": 25, "px_ignored": 300},
    {"id": "v1", "split": "val", "px_bg": 1, "px_a": 0, "px_b": 99, "px_ignored": 0},
]


def _hand_made_train_rows(tmp_path, rows=HAND_MADE):
    import pandas as pd

    pd.DataFrame(rows).to_csv(tmp_path / "manifest.csv", index=False)
    return split_rows(read_manifest(tmp_path), "train")


def test_median_frequency_weights_from_known_pixel_counts(tmp_path):
    rows = _hand_made_train_rows(tmp_path)
    cfg = SMALL.model_copy(update={"class_weights": "median_frequency"})
    weights = train._class_weights(cfg, rows, ["bg", "a", "b"])
    # median(freq) / freq(c): 0.325 / (2/3), 0.325 / 0.325, 0.325 / 0.175; ignored pixels count nowhere.
    assert weights == pytest.approx([0.4875, 1.0, 13 / 7], rel=1e-12)
    given = SMALL.model_copy(update={"class_weights": [1.0, 2.0, 3.0]})
    assert train._class_weights(given, rows, ["bg", "a", "b"]) == [1.0, 2.0, 3.0]
    assert train._class_weights(SMALL, rows, ["bg", "a", "b"]) is None
    with pytest.raises(SegflowError, match=r"has 3 weights but there are 4 classes") as caught:
        train._class_weights(given, rows, ["bg", "a", "b", "c"])
    assert "\n" not in str(caught.value)
    # A class absent from the training split has no frequency: refused, naming it.
    absent = [{**row, "px_b": 0} if row["split"] == "train" else row for row in HAND_MADE]
    with pytest.raises(SegflowError, match=r"median_frequency: b has no pixels in the training split") as caught:
        train._class_weights(cfg, _hand_made_train_rows(tmp_path, absent), ["bg", "a", "b"])
    assert "\n" not in str(caught.value)
    with pytest.raises(SegflowError, match=r"no pixel counts per class \(px_c\).*rerun dvc repro ingest"):
        train._class_weights(cfg, rows, ["bg", "a", "c"])


def test_class_weights_weight_the_cross_entropy_and_focal_terms_only():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 8, 8)
    target = torch.randint(0, 3, (2, 8, 8))
    target[0, :2] = IGNORE_INDEX
    weights = [0.5, 1.0, 3.0]
    weighted = losses.build_loss("dice_ce", weights)(logits, target)
    dice = losses.build_loss("dice")(logits, target)
    ce = torch.nn.functional.cross_entropy(logits, target, weight=torch.tensor(weights), ignore_index=IGNORE_INDEX)
    assert float(weighted) == pytest.approx(float(dice + ce), rel=1e-6)
    assert float(weighted) != pytest.approx(float(losses.build_loss("dice_ce")(logits, target)), rel=1e-3)
    focal = losses.build_loss("focal", weights)(logits, target)
    assert float(focal) != pytest.approx(float(losses.build_loss("focal")(logits, target)), rel=1e-3)
    # Without weights the loss is the same module as before weights existed.
    assert losses.build_loss("ce").losses[0].weight is None
    with pytest.raises(SegflowError, match="no cross-entropy or focal term"):
        losses.build_loss("lovasz", weights)


@pytest.mark.parametrize(
    ("train_section", "expected"),
    [
        ({"class_weights": "mean_frequency"}, "train.class_weights: must be null, median_frequency or a list"),
        ({"class_weights": [1.0, -2.0, 1.0, 1.0]}, "train.class_weights: must be null, median_frequency or a list"),
        ({"class_weights": []}, "train.class_weights: must be null"),
        ({"class_weights": [1, True, 1, 1]}, "train.class_weights: must be null"),
        ({"class_weights": "median_frequency", "loss": "dice"}, "train.loss dice has none; use ce, dice_ce"),
        ({"max_minutes": 0}, "train.max_minutes: Input should be greater than 0"),
        ({"max_minutes": "an hour"}, "train.max_minutes"),
        ({"val_every": 0}, "train.val_every: Input should be greater than or equal to 1"),
        ({"log_every_s": -1}, "train.log_every_s: Input should be greater than or equal to 0"),
    ],
)
def test_bad_budget_progress_and_weight_values_are_one_line_errors(train_section, expected):
    from segflow.params import ParamsError, parse_params

    with pytest.raises(ParamsError) as caught:
        parse_params({"train": train_section})
    assert expected in str(caught.value) and "\n" not in str(caught.value)
    assert str(caught.value).count(";") <= 1  # one problem named once, not once per type of a union


def test_budget_and_weight_defaults_are_off():
    """The defaults (params.yaml's too): every epoch validated, no time limit, no class weights."""
    cfg = TrainParams()
    assert (cfg.val_every, cfg.max_minutes, cfg.class_weights, cfg.log_every_s) == (1, None, None, 30.0)
    assert TrainParams(class_weights="median_frequency", max_minutes=1.5, val_every=3).max_minutes == 1.5
