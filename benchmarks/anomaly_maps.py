"""Benchmark: anomaly maps from the prior (healing) against two baselines, on synthetic lesions in held-out slices.

Inputs: a stage-1 folder (``vqvae`` output_dir) and a prior trained on its codes (``pixelcnn_prior`` output_dir),
both trained on healthy slices only. The held-out healthy images are the ``--section`` (default ``test``) of the
stage-1 model's own split; the NLL threshold is calibrated on its ``validation`` section
(:func:`vqvae_medical.stages.prior.anomaly_calibration.load_calibration`, stored next to the prior's ``model.pt``).

Each of the first ``--n_images`` held-out slices (``--spread``: evenly spaced over the section, so every subject
of a subject-split folder contributes) gets one synthetic lesion (seeded with ``--seed``; the clean slice is kept
too): an ellipse, or a blob (an ellipse whose edge is perturbed by smoothed noise), centred at a random point of the
head at least its radius + 2 + ``--margin`` pixels inside its outline (head = smoothed intensity > 0.1, holes filled;
``--margin 8`` keeps lesions off the skull and scalp of 2 mm slices that keep them), with

- size: small (radius 3-5 px), medium (6-10 px), large (11-18 px), cycled over the images;
- intensity: darker (the tissue times 0.15-0.5) or brighter (plus 0.3-0.6), alternating in pairs of sizes;
- texture: multiplied by ``1 + t * noise`` (Gaussian noise smoothed by 1 px, ``t`` in 0-0.4), soft edge (1 px).

Maps compared, all of the same models in the same run:

- ``healed``: ``|x - healed(x)|`` inside the resampling mask (the method of Pinaya et al., :mod:`.anomaly`);
- ``recon``: the VQ-VAE's own reconstruction error ``|x - recon(x)|``;
- ``nll``: the per-code NLL map of the prior without healing, bilinearly upsampled to the image.

Metrics: pixel AUPRC (``sklearn.metrics.average_precision_score`` over every pixel of the lesioned slices), best
achievable Dice (the largest Dice over all thresholds of the pooled pixels, i.e. the best F1), image AUROC of
lesioned against clean slices (score: mean of the top 1% of the map's pixels; for ``healed`` also ``nll_excess``,
the NLL above the threshold summed over codes), and per lesion size the AUPRC and the share of lesions "found"
(Dice > 0.1 at the global best-Dice threshold). The image threshold of ``configs/anomaly.json`` is applied too: the
``--score_quantile`` of the validation images' scores
(:func:`~vqvae_medical.stages.prior.anomaly_calibration.load_score_calibration`), with the share of clean and of
lesioned slices above it.

Usage::

    python benchmarks/anomaly_maps.py --autoencoder_dir OUT/vqvae --prior_dir OUT/prior --max_seq_len 572 \\
        --n_images 64 --json OUT/anomaly.json --figure docs/anomaly_brain.png

The commands that trained the models and the measured tables: ``docs/anomaly.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from vqvae_medical.networks import GatedPixelCNN, TransformerPrior
from vqvae_medical.stages.frozen import load_autoencoder
from vqvae_medical.stages.prior.anomaly import anomaly_maps
from vqvae_medical.stages.prior.anomaly_calibration import (
    CALIBRATION_FILE,
    SCORE_CALIBRATION_FILE,
    load_calibration,
    load_score_calibration,
)
from vqvae_medical.stages.prior.network import PriorNetwork, load_prior

SIZES = {"small": (3, 5), "medium": (6, 10), "large": (11, 18)}
METHODS = ("healed", "recon", "nll")


def make_lesion(
    image: np.ndarray, index: int, rng: np.random.Generator, margin: float = 0.0
) -> tuple[np.ndarray, np.ndarray, dict]:
    """A lesioned copy of ``image`` ``[H, W]`` in [0, 1], its mask, and what was drawn (see the module docstring);
    ``margin``: pixels more between the lesion and the head outline (skull and scalp of images that keep them)."""
    size = list(SIZES)[index % 3]
    darker = (index // 3) % 2 == 0
    r_lo, r_hi = SIZES[size]
    radius = rng.uniform(r_lo, r_hi)
    brain = ndimage.binary_fill_holes(ndimage.gaussian_filter(image, 1.0) > 0.1)
    inside = ndimage.distance_transform_edt(brain) > radius + 2 + margin
    if not inside.any():
        inside = ndimage.distance_transform_edt(brain) >= ndimage.distance_transform_edt(brain).max()
    ys, xs = np.nonzero(inside)
    k = int(rng.integers(len(ys)))
    cy, cx = ys[k], xs[k]
    ratio, angle = rng.uniform(0.6, 1.0), rng.uniform(0, math.pi)
    yy, xx = np.mgrid[: image.shape[0], : image.shape[1]].astype(np.float64)
    u = (yy - cy) * math.cos(angle) + (xx - cx) * math.sin(angle)
    v = -(yy - cy) * math.sin(angle) + (xx - cx) * math.cos(angle)
    dist = np.sqrt((u / radius) ** 2 + (v / (radius * ratio)) ** 2)
    blob = rng.random() < 0.5
    if blob:
        dist = dist + 0.35 * ndimage.gaussian_filter(rng.standard_normal(image.shape), radius / 2) * radius / 2
    mask = (dist <= 1.0) & brain
    soft = np.clip(ndimage.gaussian_filter(mask.astype(np.float64), 1.0), 0, 1)
    texture = rng.uniform(0.0, 0.4)
    noise = ndimage.gaussian_filter(rng.standard_normal(image.shape), 1.0)
    noise = noise / (noise.std() + 1e-8)
    if darker:
        change = rng.uniform(0.15, 0.5)
        lesion = image * change
    else:
        change = rng.uniform(0.3, 0.6)
        lesion = image + change
    lesion = lesion * (1 + texture * noise)
    out = np.clip(image * (1 - soft) + lesion * soft, 0, 1)
    info = {
        "size": size,
        "radius": float(radius),
        "darker": darker,
        "blob": blob,
        "change": float(change),
        "texture": float(texture),
        "area_px": int(mask.sum()),
    }
    return out.astype(np.float32), mask, info


def _top_mean(maps: np.ndarray, fraction: float = 0.01) -> np.ndarray:
    flat = maps.reshape(maps.shape[0], -1)
    k = max(1, round(fraction * flat.shape[1]))
    return np.sort(flat, axis=1)[:, -k:].mean(1)


def _best_dice(scores: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    precision, recall, thresholds = precision_recall_curve(truth, scores)
    dice = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    best = int(np.argmax(dice[:-1])) if len(thresholds) else 0
    return float(dice[best]), float(thresholds[best]) if len(thresholds) else 0.0


def run_maps(autoencoder, network, images: torch.Tensor, thresholds, batch_size: int, seed: int, sigma: float):
    """Maps of every method ``{method: [N, H, W]}`` and the image scores of the healed maps."""
    generator = torch.Generator().manual_seed(seed)
    maps = {m: [] for m in METHODS}
    scores = {"nll_excess": [], "map_top": []}
    resampled = []
    for start in range(0, images.shape[0], batch_size):
        x = images[start : start + batch_size]
        r = anomaly_maps(autoencoder, network, x, thresholds, mask_sigma=sigma, generator=generator)
        maps["healed"].append(r.maps[:, 0].numpy())
        maps["recon"].append((x - r.reconstruction).abs().mean(1).numpy())
        nll = F.interpolate(r.nll[-1][:, None], size=list(x.shape[2:]), mode="bilinear", align_corners=False)
        maps["nll"].append(nll[:, 0].numpy())
        scores["nll_excess"].append(r.scores["nll_excess"].numpy())
        scores["map_top"].append(r.scores["map_top"].numpy())
        resampled.append(r.resampled.numpy())
    return (
        {k: np.concatenate(v) for k, v in maps.items()},
        {k: np.concatenate(v) for k, v in scores.items()},
        np.concatenate(resampled),
    )


def evaluate(maps_lesioned, maps_clean, masks, infos, scores_lesioned, scores_clean) -> dict:
    truth = masks.reshape(-1).astype(np.uint8)
    result: dict = {}
    for m in METHODS:
        pixels = maps_lesioned[m].reshape(-1)
        auprc = float(average_precision_score(truth, pixels))
        dice, threshold = _best_dice(pixels, truth)
        labels = np.r_[np.zeros(len(masks)), np.ones(len(masks))]
        auroc = float(roc_auc_score(labels, np.r_[_top_mean(maps_clean[m]), _top_mean(maps_lesioned[m])]))
        per_size = {}
        for size in SIZES:
            idx = [i for i, info in enumerate(infos) if info["size"] == size]
            sub_truth = masks[idx].reshape(-1).astype(np.uint8)
            sub = maps_lesioned[m][idx]
            found = []
            for i in idx:
                pred = maps_lesioned[m][i] >= threshold
                inter = float((pred & masks[i]).sum())
                found.append(2 * inter / max(float(pred.sum() + masks[i].sum()), 1.0) > 0.1)
            per_size[size] = {
                "auprc": float(average_precision_score(sub_truth, sub.reshape(-1))),
                "found": float(np.mean(found)),
                "n": len(idx),
            }
        for polarity, want in (("darker", True), ("brighter", False)):
            idx = [i for i, info in enumerate(infos) if info["darker"] == want]
            per_size[polarity] = {
                "auprc": float(
                    average_precision_score(masks[idx].reshape(-1).astype(np.uint8), maps_lesioned[m][idx].reshape(-1))
                ),
                "n": len(idx),
            }
        result[m] = {"pixel_auprc": auprc, "best_dice": dice, "image_auroc_top1pct": auroc, "by_lesion": per_size}
    labels = np.r_[np.zeros(len(masks)), np.ones(len(masks))]
    result["healed"]["image_auroc_nll_excess"] = float(
        roc_auc_score(labels, np.r_[scores_clean["nll_excess"], scores_lesioned["nll_excess"]])
    )
    result["pixel_auprc_ratio_vs_recon"] = result["healed"]["pixel_auprc"] / max(result["recon"]["pixel_auprc"], 1e-12)
    result["prevalence"] = float(truth.mean())
    return result


def save_figure(path, images, lesioned, masks, maps, n: int = 6) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = [i for size in SIZES for i in range(len(masks)) if list(SIZES)[i % 3] == size][:: max(1, len(masks) // n)]
    rows = sorted(order[:n])
    cols = ["lesioned input", "healed map", "reconstruction error", "NLL (no healing)"]
    fig, axes = plt.subplots(len(rows), 4, figsize=(9.5, 2.6 * len(rows)), squeeze=False)
    for r, i in enumerate(rows):
        panels = [lesioned[i], maps["healed"][i], maps["recon"][i], maps["nll"][i]]
        for c, (ax, arr) in enumerate(zip(axes[r], panels, strict=True)):
            ax.imshow(arr, cmap="gray" if c == 0 else "hot", vmin=0, vmax=1 if c == 0 else max(float(arr.max()), 1e-6))
            ax.contour(masks[i], levels=[0.5], colors="c", linewidths=0.6)
            ax.set_title(cols[c] if r == 0 else "", fontsize=8)
            ax.axis("off")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--autoencoder_dir", required=True)
    parser.add_argument("--prior_dir", required=True, help="the prior's output_dir (models/model.pt, cache/)")
    parser.add_argument("--gated", action="store_true", help="the prior is the gated PixelCNN of configs/gated.json")
    parser.add_argument("--num_embeddings", type=int, default=256)
    parser.add_argument("--max_seq_len", type=int, default=1024)
    parser.add_argument("--channels", type=int, default=None, help="prior width (default: 128 transformer, 64 gated)")
    parser.add_argument("--num_layers", type=int, default=None, help="default: 6 transformer, 12 gated")
    parser.add_argument("--num_heads", type=int, default=4)
    parser.add_argument("--section", default="test")
    parser.add_argument("--n_images", type=int, default=64)
    parser.add_argument("--spread", action="store_true",
                        help="take n_images evenly spaced slices of the section (all subjects) instead of the first")
    parser.add_argument("--quantile", type=float, default=0.99)
    parser.add_argument("--mask_sigma", type=float, default=0.0)
    parser.add_argument(
        "--margin",
        type=float,
        default=0.0,
        help="pixels between a lesion and the head outline (e.g. 8 for 2 mm slices with the skull)",
    )
    parser.add_argument(
        "--score_quantile",
        type=float,
        default=0.95,
        help="image threshold: this quantile of the held-out healthy (validation) images' scores",
    )
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None)
    parser.add_argument("--figure", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    prior_dir = Path(args.prior_dir)
    autoencoder = load_autoencoder(args.autoencoder_dir)
    if args.gated:
        model = GatedPixelCNN(2, args.num_embeddings, args.channels or 64, args.num_layers or 12)
    else:
        model = TransformerPrior(
            2, args.num_embeddings, args.max_seq_len, args.channels or 128, args.num_layers or 6, args.num_heads
        )
    ckpt = prior_dir / "models" / "model.pt"
    network = load_prior(PriorNetwork(model), ckpt)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    calibration = load_calibration(
        ckpt.parent / CALIBRATION_FILE,
        autoencoder,
        network,
        ckpt,
        args.quantile,
        "validation",
        None,
        prior_dir / "cache",
    )
    items = autoencoder.datalist(prior_dir / "cache")[args.section]
    if args.spread and len(items) > args.n_images:
        items = [items[int(i)] for i in np.linspace(0, len(items) - 1, args.n_images).round()]
    items = items[: args.n_images]
    transform = autoencoder.transforms()
    clean = torch.stack([transform(dict(i))["image"].as_tensor() for i in items]).float()
    rng = np.random.default_rng(args.seed)
    lesioned, masks, infos = [], [], []
    for i in range(clean.shape[0]):
        out, mask, info = make_lesion(clean[i, 0].numpy(), i, rng, args.margin)
        lesioned.append(out)
        masks.append(mask)
        infos.append(info)
    lesioned_t = torch.from_numpy(np.stack(lesioned))[:, None]
    masks_np = np.stack(masks)
    thresholds = calibration["thresholds_nats"]
    cpu1 = time.process_time()
    maps_l, scores_l, res_l = run_maps(
        autoencoder, network, lesioned_t, thresholds, args.batch_size, args.seed, args.mask_sigma
    )
    maps_c, scores_c, res_c = run_maps(
        autoencoder, network, clean, thresholds, args.batch_size, args.seed, args.mask_sigma
    )
    cpu2 = time.process_time()
    result = evaluate(maps_l, maps_c, masks_np, infos, scores_l, scores_c)
    # the image threshold of configs/anomaly.json: the score_quantile of the validation images' scores
    healthy = load_score_calibration(
        ckpt.parent / SCORE_CALIBRATION_FILE,
        autoencoder,
        network,
        ckpt,
        calibration,
        cache_dir=prior_dir / "cache",
        mask_sigma=args.mask_sigma,
        seed=args.seed,
    )
    result["calibrated_image_threshold"] = {}
    for name in ("map_top", "nll_excess"):
        threshold = float(np.quantile(healthy["scores"][name], args.score_quantile))
        result["calibrated_image_threshold"][name] = {
            "threshold": threshold,
            "n_healthy": healthy["n_images"],
            "flagged_clean": float((scores_c[name] > threshold).mean()),
            "flagged_lesioned": float((scores_l[name] > threshold).mean()),
            "flagged_lesioned_by_size": {
                size: float(
                    np.mean([scores_l[name][i] > threshold for i, info in enumerate(infos) if info["size"] == size])
                )
                for size in SIZES
            },
        }
    result.update(
        {
            "n_images": int(clean.shape[0]),
            "section": args.section,
            "quantile": args.quantile,
            "thresholds_nats": thresholds,
            "calibration_mean_nll_bits": calibration["mean_nll_bits"],
            "resampled_share_lesioned": float(res_l.mean()),
            "resampled_share_clean": float(res_c.mean()),
            "mask_sigma": args.mask_sigma,
            "seed": args.seed,
            "margin": args.margin,
            "score_quantile": args.score_quantile,
            "cpu_seconds_per_image": (cpu2 - cpu1) / (2 * clean.shape[0]),
            "cpu_seconds_total": time.process_time() - cpu0,
            "wall_seconds_total": time.perf_counter() - wall0,
            "lesions": infos,
        }
    )
    header = f"{'map':8s} {'AUPRC':>7s} {'Dice*':>6s} {'AUROC':>6s}"
    lines = [header + "  AUPRC small/medium/large  found small/medium/large"]
    for m in METHODS:
        r = result[m]
        by = r["by_lesion"]
        lines.append(
            f"{m:8s} {r['pixel_auprc']:7.3f} {r['best_dice']:6.3f} {r['image_auroc_top1pct']:6.3f}  "
            + "/".join(f"{by[s]['auprc']:.3f}" for s in SIZES)
            + "  "
            + "/".join(f"{by[s]['found']:.2f}" for s in SIZES)
        )
    lines.append(
        f"healed image AUROC with nll_excess: {result['healed']['image_auroc_nll_excess']:.3f}; "
        f"AUPRC ratio healed/recon {result['pixel_auprc_ratio_vs_recon']:.2f}; "
        f"lesion pixel share {result['prevalence']:.4f}; codes resampled: clean "
        f"{result['resampled_share_clean']:.3f}, lesioned {result['resampled_share_lesioned']:.3f}"
    )
    for name, r in result["calibrated_image_threshold"].items():
        lines.append(
            f"calibrated image threshold ({name}, {args.score_quantile} of {r['n_healthy']} validation "
            f"images): flagged clean {r['flagged_clean']:.2f}, lesioned {r['flagged_lesioned']:.2f} "
            "(small/medium/large " + "/".join(f"{v:.2f}" for v in r["flagged_lesioned_by_size"].values()) + ")"
        )
    print("\n".join(lines))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    if args.figure:
        save_figure(args.figure, clean[:, 0].numpy(), np.stack(lesioned), masks_np, maps_l)


if __name__ == "__main__":
    main()
