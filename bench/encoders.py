"""Lightweight encoders for real-time use: size, MACs and inference speed beside resnet18/34.

Side by side in one run, each encoder under the same decoder (smp ``Unet``,
encoder depth 5, default decoder widths, 4 classes, random init: the weights do
not change the arithmetic): parameters, multiply-accumulates of one forward pass
(``torch.utils.flop_counter``) and inference images/s at 256x256 (batch 1, the
real-time case) and 512x512 (batch 1), fp32 on this machine's CPU threads (and
on CUDA, bf16 autocast, when there is a GPU). Every timing is the median of
timed passes after warm-up passes; order is interleaved (round robin over
encoders) so a slow minute on a shared machine does not land on one encoder.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

TITLE = "Encoders: size, MACs and inference speed (Unet decoder)"

#: (encoder, Unet decoder widths): smp's default decoder (256-128-64-32-16), then a narrow one, where the
#: decoder stops dominating the cost.
NARROW = (64, 32, 16, 16, 8)
ENCODERS = [
    ("resnet34", None),
    ("resnet18", None),
    ("efficientnet-b0", None),
    ("mobilenet_v2", None),
    ("tu-mobilenetv3_large_100", None),
    ("tu-mobilenetv3_small_100", None),
    ("mobileone_s0", None),
    ("resnet18", NARROW),
    ("mobilenet_v2", NARROW),
    ("tu-mobilenetv3_small_100", NARROW),
]
SIZES = (256, 512)
ROUNDS, WARMUP = 7, 2


def _build(encoder: str, decoder):
    import torch

    from segflow.semantic import factory

    torch.manual_seed(0)
    return factory.create("Unet", encoder, 5, list(decoder) if decoder else None, 4).eval()


def _label(encoder: str, decoder) -> str:
    return f"{encoder}, decoder {'-'.join(map(str, decoder))}" if decoder else encoder


def run(work: Path) -> str:
    import torch

    from segflow.semantic import measure

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = []
    for device in devices:
        models = {}
        for encoder, decoder in ENCODERS:
            name = _label(encoder, decoder)
            try:
                models[name] = _build(encoder, decoder).to(device)
            except Exception as error:  # an encoder this smp/timm lacks: say so in the table, measure the rest
                rows.append({"encoder": name, "device": device, "error": " ".join(str(error).split())[:80]})
        times = {(e, s): [] for e in models for s in SIZES}
        inputs = {s: torch.rand(1, 3, s, s, device=device) for s in SIZES}
        autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)
        )
        with torch.inference_mode(), autocast:
            for round_ in range(WARMUP + ROUNDS):
                for encoder, model in models.items():
                    for size in SIZES:
                        started = time.perf_counter()
                        model(inputs[size])
                        if device == "cuda":
                            torch.cuda.synchronize()
                        if round_ >= WARMUP:
                            times[encoder, size].append(time.perf_counter() - started)
        for encoder, model in models.items():
            size_info = measure.size(model, 3, 256)
            row = {
                "encoder": encoder,
                "device": device,
                "params_m": size_info["parameters"] / 1e6,
                "gmacs": size_info["gmacs"],
            }
            for size in SIZES:
                row[f"ips_{size}"] = 1 / statistics.median(times[encoder, size])
            rows.append(row)
    threads = torch.get_num_threads()
    lines = [
        "Unet (depth 5; smp's default decoder 256-128-64-32-16 unless named), 4 classes, batch 1; "
        f"CPU fp32 on {threads} threads"
        + (", CUDA bf16 autocast" if "cuda" in devices else " (no GPU here)")
        + f"; median of {ROUNDS} passes after {WARMUP} warm-up passes, encoders interleaved.",
        "",
        "| encoder | device | params (M) | GMACs @256 | images/s @256 | images/s @512 | vs resnet18 @256 |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    base = {r["device"]: r for r in rows if r["encoder"] == "resnet18" and "error" not in r}
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['encoder']} | {r['device']} | not available: {r['error']} | | | | |")
            continue
        ratio = r["ips_256"] / base[r["device"]]["ips_256"] if r["device"] in base else float("nan")
        lines.append(
            f"| {r['encoder']} | {r['device']} | {r['params_m']:.2f} | {r['gmacs']:.2f} | {r['ips_256']:.1f} | "
            f"{r['ips_512']:.1f} | {ratio:.2f}x |"
        )
    lines += [
        "",
        "With smp's default Unet decoder most of the MACs are the decoder's, so a light encoder alone buys "
        "little; with a narrow decoder (`train.decoder_channels`) the encoder's cost shows. Fewer MACs do not "
        "buy the same factor of CPU speed either: depthwise convolutions (MobileNet, EfficientNet) run far below "
        "the CPU's peak per MAC, so rank by images/s. mobileone_s0 is measured as trained (its branches are "
        "not re-parameterised into one convolution, which smp leaves to the user). Use with "
        "`train.encoder: <name>` (any decoder).",
    ]
    return "\n".join(lines)
