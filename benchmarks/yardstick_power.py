"""Floor, power and seed spread of every two-sample test of the sample-quality yardstick, on folders of images.

The tests (``vqvae_medical.evaluation.sample_quality``, the names of ``C2ST_TESTS``): ``downsampled`` (the CNN on
64 x 64 area-downsampled images, the bundles' ``c2st_accuracy``), ``full`` (the same CNN on the central 128 px
of native pixels, ``c2st_full_accuracy``) and ``stats`` (a logistic regression on per-image statistics,
``c2st_stats_accuracy``). Every case compares set A against set B, ``--n`` images each, drawn with the seed:

- ``real|real``, ``decoded|decoded``: disjoint halves of one folder (the floor: should be near 0.5);
- ``real|decoded``: real slices against the autoencoder's reconstructions (the decoder's own signature);
- ``decoded|blur_<s>``, ``decoded|noise_<s>``, ``decoded|speckle_<p>``, ``decoded|less_varied``: one half of the
  decoded images against the other half degraded: Gaussian blur (sigma ``s`` px), Gaussian noise (std ``s``),
  background speckle (a share ``p`` of the background pixels set to uniform values in [0.01, 0.06]), and each
  image's intensities scaled towards the set's mean brightness so that brightness varies 5x less between images;
- ``decoded|<folder name>`` for every ``--samples`` folder (e.g. a generator's samples).

Prints one JSON line per case, test and seed (accuracy, process CPU seconds), then a markdown table (mean and
range over the seeds) and, for the ``stats`` test, the per-statistic effect and spread ratio of each case.

``audit`` runs the memorisation audit (``vqvae_medical.stages.memorisation``) of a stage-1 folder's own split:
decoded training images (copies), decoded held-out images and half of each. ``decode`` writes the
reconstructions of a real folder through a stage-1 output folder as PNGs first::

    python benchmarks/yardstick_power.py decode --autoencoder_dir RUN/vqvae --real ../shared/data/brain_mri_2d \\
        --out $TMPDIR/decoded --n 256
    OMP_NUM_THREADS=1 python benchmarks/yardstick_power.py score --real ../shared/data/brain_mri_2d \\
        --decoded $TMPDIR/decoded --n 128 --seeds 0,1,2
    OMP_NUM_THREADS=1 python benchmarks/yardstick_power.py audit --autoencoder_dir RUN/vqvae --out $TMPDIR/audit
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vqvae_medical.evaluation.image_statistics import image_statistics, logistic_c2st, statistics_comparison
from vqvae_medical.evaluation.sample_quality import C2ST_TEST_DEFAULTS, blur_images, c2st_accuracy, stats_c2st_accuracy

SUFFIXES = (".png", ".jpg", ".jpeg")


def image_files(folder: Path) -> list[Path]:
    """The images of ``folder`` and its subfolders, sorted."""
    return sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in SUFFIXES)


def load_folder(folder: Path, n: int, seed: int, rescale: bool = False) -> tuple[torch.Tensor, list[Path]]:
    """``n`` images of ``folder`` drawn with ``seed`` (grey, [0, 1], ``[n, 1, H, W]``) and their files; with
    ``rescale`` each image min-max scaled to [0, 1], as the stage-1 preprocessing scales real images."""
    files = image_files(folder)
    if len(files) < n:
        raise ValueError(f"{folder} holds {len(files)} images, {n} are needed.")
    pick = np.random.default_rng(seed).permutation(len(files))[:n]
    chosen = [files[i] for i in pick]
    arrays = [np.asarray(Image.open(f).convert("L"), dtype=np.float32) / 255.0 for f in chosen]
    if rescale:
        arrays = [(a - a.min()) / max(float(a.max() - a.min()), 1e-6) for a in arrays]
    return torch.from_numpy(np.stack(arrays))[:, None], chosen


def decode(args: argparse.Namespace) -> None:
    """Reconstructions (encode, nearest codes, decode) of ``--n`` images of ``--real`` as 8-bit PNGs in ``--out``."""
    from vqvae_medical.stages.frozen import load_autoencoder

    autoencoder = load_autoencoder(args.autoencoder_dir)
    transform = autoencoder.transforms()
    _, files = load_folder(args.real, args.n, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.process_time()
    with torch.no_grad():
        for i, f in enumerate(files):
            x = transform({"image": str(f)})["image"]
            x = torch.as_tensor(x.as_tensor() if hasattr(x, "as_tensor") else x)[None]
            y = autoencoder.decode_from_indices(autoencoder.encode_to_indices(x), list(x.shape[2:])).clamp(0, 1)
            Image.fromarray((y[0, 0].numpy() * 255).round().astype(np.uint8)).save(args.out / f"{i:04d}_{f.stem}.png")
    print(json.dumps({"decoded": len(files), "out": str(args.out), "cpu_seconds": time.process_time() - start}))


def speckle(images: torch.Tensor, share: float, seed: int) -> torch.Tensor:
    """A ``share`` of each image's background pixels (below 0.01) set to uniform values in [0.01, 0.06]."""
    g = torch.Generator().manual_seed(seed)
    hit = (torch.rand(images.shape, generator=g) < share) & (images < 0.01)
    return torch.where(hit, 0.01 + 0.05 * torch.rand(images.shape, generator=g), images)


def less_varied(images: torch.Tensor, factor: float = 5.0) -> torch.Tensor:
    """Each image scaled so that its mean brightness moves ``1 - 1 / factor`` of the way to the set's mean."""
    means = images.mean(dim=tuple(range(1, images.ndim)), keepdim=True)
    target = means.mean() + (means - means.mean()) / factor
    return (images * target / means.clamp_min(1e-6)).clamp(0, 1)


def degrade(images: torch.Tensor, name: str, seed: int) -> torch.Tensor:
    kind, _, level = name.partition("_")
    if kind == "blur":
        return blur_images(images, float(level))
    if kind == "noise":
        noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed))
        return (images + float(level) * noise).clamp(0, 1)
    if kind == "speckle":
        return speckle(images, float(level), seed)
    if name == "less_varied":
        return less_varied(images)
    raise ValueError(f"unknown degradation {name!r}")


def run_test(test: str, a: torch.Tensor, b: torch.Tensor, seed: int, features: tuple | None = None) -> float:
    if test == "stats":
        if features is not None:  # the statistics of both sets, computed once per case
            return logistic_c2st(*features, seed=seed)
        return stats_c2st_accuracy(a, b, seed=seed)
    return c2st_accuracy(a, b, seed=seed, **{**C2ST_TEST_DEFAULTS[test], **TEST_OVERRIDES.get(test, {})})


TEST_OVERRIDES: dict[str, dict] = {}


def score(args: argparse.Namespace) -> None:
    n = args.n
    seeds = [int(s) for s in args.seeds.split(",")]
    tests = args.tests.split(",")
    if args.epochs is not None:
        TEST_OVERRIDES.update({t: {"epochs": args.epochs} for t in ("downsampled", "full")})
    folders = {"real": args.real, "decoded": args.decoded, **{p.name: p for p in args.samples}}
    print(
        json.dumps(
            {
                "torch_threads": torch.get_num_threads(),
                "n_per_set": n,
                "seeds": seeds,
                "tests": tests,
                "epochs": args.epochs,
            }
        )
    )
    rows: dict[tuple[str, str], list[float]] = {}
    effects: dict[str, dict] = {}
    pools: dict[tuple[str, int, int], torch.Tensor] = {}

    def pool(name: str, size: int, seed: int) -> torch.Tensor:
        if (name, size, seed) not in pools:
            pools[(name, size, seed)] = load_folder(folders[name], size, seed, rescale=name == "real")[0]
        return pools[(name, size, seed)]

    for case in args.cases.split(","):
        left, _, right = case.partition("|")
        for seed in seeds:
            both = pool(left, 2 * n, seed)
            a, b = both[:n], both[n:]
            if right in folders and right != left:
                b = pool(right, n, seed + 1000)
            elif right != left:
                b = degrade(b, right, seed)
            if a.shape[1:] != b.shape[1:]:
                raise ValueError(f"{case}: image sizes differ ({list(a.shape[1:])} and {list(b.shape[1:])}).")
            features = None
            if "stats" in tests:
                start = time.process_time()
                features = (image_statistics(a), image_statistics(b))
                feature_cpu = time.process_time() - start
                if seed == seeds[0]:
                    effects[case] = statistics_comparison(*features)
            for test in tests:
                if test != "stats" and args.cnn_cases and case not in args.cnn_cases.split(","):
                    continue
                if test != "stats" and seed not in seeds[: args.cnn_seeds]:
                    continue
                start = time.process_time()
                acc = run_test(test, a, b, seed, features)
                cpu = time.process_time() - start + (feature_cpu if test == "stats" else 0.0)
                rows.setdefault((case, test), []).append(acc)
                print(
                    json.dumps({"case": case, "test": test, "seed": seed, "accuracy": acc, "cpu_seconds": cpu}),
                    flush=True,
                )
    print("\n| A vs B | " + " | ".join(tests) + " |\n| --- |" + " ---: |" * len(tests))
    for case in args.cases.split(","):
        cells = []
        for test in tests:
            v = rows.get((case, test))
            cells.append(
                "—" if not v else f"{np.mean(v):.3f}" + (f" ({min(v):.2f}-{max(v):.2f})" if len(v) > 1 else "")
            )
        print(f"| {case} | " + " | ".join(cells) + " |")
    if effects:
        print("\nstats test, per statistic: effect in pooled SD / spread ratio (B over A), first seed")
        for case, comparison in effects.items():
            top = sorted(comparison.items(), key=lambda kv: -abs(kv[1]["effect_sd"] or 0))[:4]
            shown = ", ".join(f"{k} {v['effect_sd']:+.1f} / {v['spread_ratio']:.2f}" for k, v in top)
            print(f"- {case}: {shown}")


def audit(args: argparse.Namespace) -> None:
    """The memorisation audit on reconstructions of a stage-1 folder's own split: decoded training images (copies),
    decoded held-out test images (honest samples; the other half of the test split calibrates) and half of each."""
    from vqvae_medical.evaluation.sample_report import load_real_images
    from vqvae_medical.stages.frozen import load_autoencoder
    from vqvae_medical.stages.memorisation import MemorisationAudit

    autoencoder = load_autoencoder(args.autoencoder_dir)
    datalist = autoencoder.datalist(args.out / "cache")
    train, test = datalist["training"], datalist["test"]
    transform = autoencoder.transforms()
    real = load_real_images(test, transform, len(test), seed=0)
    calibration, honest = real[: len(real) // 2], real[len(real) // 2 :]
    check = MemorisationAudit(args.out / "eval", autoencoder, train, args.out / "cache" / "codes_training.pt")
    copies, copy_codes = check.reconstruct(load_real_images(train, transform, args.n_copies, seed=1))
    held, held_codes = check.reconstruct(honest)
    k = min(args.n_copies, len(held))
    sets = {
        "decoded training images": (copies, copy_codes),
        "decoded held-out images": (held, held_codes),
        "half and half": (torch.cat([copies[:k], held[:k]]), torch.cat([copy_codes[:k], held_codes[:k]])),
    }
    for name, (x, codes) in sets.items():
        print(json.dumps({"set": name, "n": len(x), **check(x, calibration, codes)}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("decode", help="reconstruct real images through a stage-1 output folder")
    d.add_argument("--autoencoder_dir", type=Path, required=True)
    d.add_argument("--real", type=Path, default=Path("../shared/data/brain_mri_2d"))
    d.add_argument("--out", type=Path, required=True)
    d.add_argument("--n", type=int, default=256)
    d.add_argument("--seed", type=int, default=0)
    m = sub.add_parser("audit", help="the memorisation audit on copies and on held-out images")
    m.add_argument("--autoencoder_dir", type=Path, required=True)
    m.add_argument("--out", type=Path, required=True, help="cache and eval folder")
    m.add_argument("--n_copies", type=int, default=32)
    s = sub.add_parser("score", help="run the tests on the cases")
    s.add_argument("--real", type=Path, default=Path("../shared/data/brain_mri_2d"))
    s.add_argument("--decoded", type=Path, required=True)
    s.add_argument("--samples", type=Path, nargs="*", default=[])
    s.add_argument("--n", type=int, default=128, help="images per set")
    s.add_argument("--seeds", default="0,1,2")
    s.add_argument("--tests", default="stats,downsampled,full")
    s.add_argument(
        "--cases",
        default="real|real,decoded|decoded,real|decoded,decoded|blur_1.0,decoded|blur_0.5,decoded|noise_0.02,"
        "decoded|speckle_0.16,decoded|less_varied",
    )
    s.add_argument("--cnn_cases", default="", help="comma-separated cases the CNN tests run on (default all)")
    s.add_argument("--cnn_seeds", type=int, default=3, help="the CNN tests run on the first this many seeds")
    s.add_argument("--epochs", type=int, default=None, help="CNN epochs instead of the default (a cost probe)")
    args = parser.parse_args()
    {"decode": decode, "audit": audit, "score": score}[args.command](args)


if __name__ == "__main__":
    main()
