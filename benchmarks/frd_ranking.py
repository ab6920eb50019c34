"""Does the Fréchet Radiomic Distance rank degradations as the c2st yardstick does? (issue 30, part 5, optional)

FRD (Konz et al., "Fréchet Radiomic Distance (FRD): A Versatile Metric for Comparing Medical Imaging Datasets",
arXiv:2412.01496; ``frd-score`` on PyPI) compares two image folders through radiomic features (pyradiomics), with no
downloaded weights. It is an extra of this project, not a dependency: install it beside the package, e.g.

    python -m venv --system-site-packages $TMPDIR/frd && $TMPDIR/frd/bin/pip install frd-score pyradiomics-bhklab
    $TMPDIR/frd/bin/python benchmarks/frd_ranking.py --data-dir ../shared/data/brain_mri_2d --n 64 --out $TMPDIR/frd_out

Draws ``2 n`` test slices (seeded) of ``brain_mri_2d``, splits them into A and B, and writes PNG folders of B and of
B degraded (Gaussian blur sigma 0.5/1/2 px, Gaussian noise 0.02/0.05, background speckle 16%), plus any sample
folders given with ``--samples NAME=FOLDER``. For each it prints FRD(A, X) (FRD v1, log scale: lower is closer)
and the image-statistics c2st accuracy of A against X (``vqvae_medical.evaluation.image_statistics``), then the
Spearman correlation of the two rankings.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vqvae_medical.evaluation.image_statistics import image_statistics, logistic_c2st
from vqvae_medical.evaluation.sample_quality import blur_images

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sample_quality import load_slices  # noqa: E402  (benchmarks/sample_quality.py: the same test slices)


def speckle(images: torch.Tensor, share: float, seed: int) -> torch.Tensor:
    """A ``share`` of each image's background pixels (< 0.01) set to uniform values in [0.01, 0.06]."""
    g = torch.Generator().manual_seed(seed)
    hit = (images < 0.01) & (torch.rand(images.shape, generator=g) < share)
    return torch.where(hit, 0.01 + 0.05 * torch.rand(images.shape, generator=g), images)


def write_folder(images: torch.Tensor, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        array = (image[0].clamp(0, 1).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(array).save(folder / f"{i:04d}.png")
    return folder


def sample_folder(folder: Path, copy_to: Path) -> Path:
    """A folder with only the samples: a bundle's inference folder also holds its grid (``samples.png``), which
    FRD would read as one more image; its ``sample_*.png`` are copied to ``copy_to``."""
    paths = sorted(folder.glob("sample_*.png"))
    if not paths:
        return folder
    copy_to.mkdir(parents=True, exist_ok=True)
    for path in paths:
        shutil.copyfile(path, copy_to / path.name)
    return copy_to


def read_folder(folder: Path) -> torch.Tensor:
    paths = sorted(folder.glob("*.png"))
    if not paths:
        raise SystemExit(f"{folder} holds no PNG images.")
    arrays = [np.asarray(Image.open(p).convert("L"), dtype=np.float32) / 255.0 for p in paths]
    return torch.from_numpy(np.stack(arrays))[:, None]


def spearman(x: list[float], y: list[float]) -> float:
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    return float(np.corrcoef(rx, ry)[0, 1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data/brain_mri_2d"))
    parser.add_argument("--n", type=int, default=64, help="images per set")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True, help="folder for the PNG sets")
    parser.add_argument("--samples", nargs="*", default=[], help="NAME=FOLDER of generated PNGs (same size)")
    parser.add_argument(
        "--samples-reference",
        type=Path,
        default=None,
        help="compare the --samples folders with this folder of real PNGs instead (e.g. the chain's slices written "
        "by benchmarks/chain_realism.py --write-reference); skips the degradation ladder",
    )
    args = parser.parse_args()
    try:
        from frd_score.frd import compute_frd
    except ImportError as error:
        raise SystemExit(f"frd-score is not installed ({error}); see this script's docstring.") from None
    samples = {
        name: sample_folder(Path(folder), args.out / name)
        for name, _, folder in (item.partition("=") for item in args.samples)
    }
    if args.samples_reference is not None:
        compare(args.samples_reference, samples, args.seed, compute_frd)
        return
    x = load_slices(args.data_dir, 2 * args.n, args.seed)
    a, b = x[: args.n], x[args.n :]
    g = torch.Generator().manual_seed(1)
    cases = {
        "real": b,
        "blur_0.5": blur_images(b, 0.5),
        "blur_1": blur_images(b, 1.0),
        "blur_2": blur_images(b, 2.0),
        "noise_0.02": (b + 0.02 * torch.randn(b.shape, generator=g)).clamp(0, 1),
        "noise_0.05": (b + 0.05 * torch.randn(b.shape, generator=g)).clamp(0, 1),
        "speckle_0.16": speckle(b, 0.16, seed=2),
    }
    reference = write_folder(a, args.out / "reference")
    folders = {name: write_folder(images, args.out / name) for name, images in cases.items()}
    folders.update(samples)
    compare(reference, folders, args.seed, compute_frd)


def compare(reference: Path, folders: dict, seed: int, compute_frd) -> None:
    """FRD and the image-statistics c2st of ``reference`` against every folder, and their rank correlation."""
    reference_features = image_statistics(read_folder(reference))
    frds, c2sts = [], []
    for name, folder in folders.items():
        t0, w0 = time.process_time(), time.perf_counter()
        frd = float(compute_frd([str(reference), str(folder)], match_sample_count=True, num_workers=1))
        c2st = logistic_c2st(reference_features, image_statistics(read_folder(Path(folder))), seed=seed)
        frds.append(frd)
        c2sts.append(c2st)
        cpu, wall = round(time.process_time() - t0), round(time.perf_counter() - w0)
        row = {"set": name, "frd": round(frd, 3), "c2st_stats": round(c2st, 3), "cpu_s": cpu, "wall_s": wall}
        print(json.dumps(row), flush=True)
    print(json.dumps({"spearman_frd_vs_c2st": round(spearman(frds, c2sts), 3), "n_sets": len(frds)}))


if __name__ == "__main__":
    main()
