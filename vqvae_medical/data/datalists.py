"""Datalist builders: turn a data set folder (or a decathlon-style JSON) into MONAI datalists.

Every builder returns ``dict[str, list[dict]]`` whose keys are among ``"training"``, ``"validation"`` and
``"test"`` (a section without images is left out). Each item has ``"image"`` (absolute path string) and,
where known, ``"label"`` (int class index) and ``"subject"`` (str).
"""

from __future__ import annotations

import fnmatch
import inspect
import json
import os
import random
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from monai.data import load_decathlon_datalist

from vqvae_medical.data.checks import IMAGE_EXTENSIONS, DataError, image_extension

__all__ = [
    "DEFAULT_SUBJECT_PATTERN",
    "IMAGE_EXTENSIONS",
    "LAYOUTS",
    "SECTIONS",
    "SPLIT_ALIASES",
    "build_datalist",
    "class_folder_datalist",
    "class_names",
    "decathlon_datalist",
    "detect_layout",
    "folder_datalist",
    "isic_labels",
    "list_images",
    "split_by_subject",
    "split_folder_datalist",
    "subject_id",
]

SECTIONS: tuple[str, ...] = ("training", "validation", "test")
"""Datalist section names, in MONAI/decathlon spelling."""

SPLIT_ALIASES: dict[str, str] = {
    "train": "training",
    "training": "training",
    "validate": "validation",
    "validation": "validation",
    "valid": "validation",
    "val": "validation",
    "test": "test",
    "testing": "test",
}
"""Split folder suffixes (matched case-insensitively) and the datalist section they map to."""

DEFAULT_SUBJECT_PATTERN = r"^(?P<subject>IXI\d+|sub-[A-Za-z0-9]+|OAS\d_\d+|case_\d+|\d+(?=_\d+\.))"
"""Regex matched against a file's name (not its folder) to find its subject.

The named group ``subject`` (else group 1, else the whole match) is the subject id:

- IXI: ``IXI012-HH-1211_T1.nii.gz`` -> ``IXI012``;
- BIDS: ``sub-01_T1w.nii.gz`` -> ``sub-01``; OASIS-1/2: ``OAS1_0001_MR1.nii`` -> ``OAS1_0001``;
- OASIS/HIPMRI keras slices: ``case_001_slice_0.nii.png`` -> ``case_001``;
- ADNI AD_NC JPEGs: ``218391_78.jpeg`` (subject_slice) -> ``218391``.

Names that do not match have no subject and form a group of one file: ``ISIC_0000104.jpg``, and the
Kaggle OASIS-derived ``26 (19).jpg`` / ``moderateDem3.jpg`` slices, whose numbers are not subject ids
(the numbers 26..32 appear in every class), so a split of those folders is by file and leaks neighbouring
slices of one subject across sets.
"""

LAYOUTS: tuple[str, ...] = ("auto", "decathlon", "split", "class", "folder", "isic")
"""Values accepted by ``build_datalist(layout=...)``."""


def _extensions(extensions: Sequence[str]) -> tuple[str, ...]:
    exts = tuple(e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions)
    if not exts:
        raise ValueError("extensions must not be empty.")
    return tuple(sorted(exts, key=len, reverse=True))


def _has_extension(name: str, exts: tuple[str, ...]) -> bool:
    lower = name.lower()
    return any(lower.endswith(e) for e in exts)


def _strip_extension(name: str) -> str:
    ext = image_extension(name)
    return name[: -len(ext)] if ext else Path(name).stem


def list_images(
    root: str | os.PathLike, extensions: Sequence[str] = IMAGE_EXTENSIONS, recursive: bool = True
) -> list[str]:
    """Sorted absolute paths of the image files under ``root`` (hidden files and folders are ignored).

    Args:
        root: folder to search.
        extensions: file endings to keep, matched case-insensitively.
        recursive: search sub-folders too.
    """
    exts = _extensions(extensions)
    root = Path(root).absolute()
    found: list[str] = []
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a symlink loop or a second link to a folder already listed
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")) if recursive else []
        for name in filenames:
            if not name.startswith(".") and _has_extension(name, exts):
                found.append(os.path.join(dirpath, name))
    return sorted(found)


def subject_id(path: str | os.PathLike, subject_pattern: str | None = DEFAULT_SUBJECT_PATTERN) -> str | None:
    """Subject id parsed from a file name with ``subject_pattern`` (see :data:`DEFAULT_SUBJECT_PATTERN`).

    Args:
        path: image path; only its name is matched.
        subject_pattern: regex, or ``None`` to never assign a subject.

    Returns:
        the subject id, or ``None`` when the pattern does not match.
    """
    if not subject_pattern:
        return None
    match = re.search(subject_pattern, os.path.basename(os.fspath(path)))
    if match is None:
        return None
    if "subject" in match.groupdict():
        return match.group("subject")
    return match.group(1) if match.re.groups else match.group(0)


def _item(path: str, subject_pattern: str | None, label: int | None = None) -> dict:
    item: dict = {"image": path}
    if label is not None:
        item["label"] = int(label)
    subject = subject_id(path, subject_pattern)
    if subject is not None:
        item["subject"] = subject
    return item


def _drop_empty(datalist: Mapping[str, list[dict]]) -> dict[str, list[dict]]:
    return {k: list(datalist[k]) for k in SECTIONS if datalist.get(k)}


def split_by_subject(
    items: Sequence[dict],
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
    key: str = "image",
) -> dict[str, list[dict]]:
    """Split items into training/validation/test deterministically, keeping each subject in one section.

    Items with a ``"subject"`` entry are grouped by it; items without one are each their own group. Groups
    are sorted and shuffled with ``random.Random(seed)``; in that order each group goes to test, else
    validation, else training: a section with a fraction above 0 takes its first group, then a group while
    that keeps it nearer its target ``round(fraction * n_items)`` items than it is (with one-file groups the
    counts are exact). Items keep their sorted-by-path order within each section.

    Args:
        items: datalist items.
        val_fraction: fraction of items for validation, in ``[0, 1)``.
        test_fraction: fraction of items for test, in ``[0, 1)``.
        seed: shuffling seed.
        key: item key holding the path, used to sort and to group items without a subject.

    Raises:
        ValueError: fractions out of range or summing to 1 or more.
        DataError: too few groups to leave images for training.
    """
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {value}.")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(f"val_fraction + test_fraction must be below 1, got {val_fraction + test_fraction}.")
    groups: dict[str, list[dict]] = {}
    for item in sorted(items, key=lambda i: str(i[key])):
        group = f"subject:{item['subject']}" if item.get("subject") is not None else f"file:{item[key]}"
        groups.setdefault(group, []).append(item)
    order = sorted(groups)
    random.Random(seed).shuffle(order)

    n_items = len(items)
    targets = {}
    for section, fraction in (("test", test_fraction), ("validation", val_fraction)):
        targets[section] = max(1, round(fraction * n_items)) if fraction > 0 else 0
    out: dict[str, list[dict]] = {"training": [], "validation": [], "test": []}
    for group in order:
        size = len(groups[group])
        for section in ("test", "validation"):
            count, target = len(out[section]), targets[section]
            if target and (count == 0 or count + size / 2 <= target):
                out[section].extend(groups[group])
                break
        else:
            out["training"].extend(groups[group])
    if items and not out["training"]:
        raise DataError(
            f"{n_items} images in {len(groups)} subject groups are too few for val_fraction={val_fraction} and "
            f"test_fraction={test_fraction}. Add images or lower the fractions."
        )
    for section in out:
        out[section].sort(key=lambda i: str(i[key]))
    return _drop_empty(out)


def _carve_validation(datalist: dict[str, list[dict]], val_fraction: float, seed: int) -> dict[str, list[dict]]:
    """Take a validation section from training when the data set has none and ``val_fraction`` > 0."""
    if val_fraction <= 0 or datalist.get("validation") or not datalist.get("training"):
        return datalist
    carved = split_by_subject(datalist["training"], val_fraction=val_fraction, test_fraction=0.0, seed=seed)
    return _drop_empty({**datalist, "training": carved.get("training", []), "validation": carved.get("validation", [])})


def _split_dirs(root: Path, pattern: str, exclude: str | None = None) -> dict[str, Path]:
    """Map datalist sections to the sub-folders of ``root`` whose lower-case name matches ``pattern``."""
    if "{split}" not in pattern:
        raise ValueError(f"pattern must contain '{{split}}', got {pattern!r}.")
    found: dict[str, list[Path]] = {}
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        name = sub.name.lower()
        if exclude and re.search(exclude, name):
            continue
        for alias, section in SPLIT_ALIASES.items():
            if fnmatch.fnmatchcase(name, pattern.format(split=alias).lower()):
                found.setdefault(section, []).append(sub)
                break
    for section in SECTIONS:
        dirs = found.get(section, [])
        if len(dirs) > 1:
            names = ", ".join(d.name for d in dirs)
            raise DataError(
                f"{root}: several folders match the {section} split ({names}). "
                "Set the split folder pattern (or exclude) so that one folder matches each split."
            )
    return {section: dirs[0] for section, dirs in found.items()}


def _require_dir(root: str | os.PathLike) -> Path:
    path = Path(root).absolute()
    if not path.exists():
        raise DataError(f"dataset folder {path} does not exist. Set dataset_dir to a folder of images.")
    if not path.is_dir():
        raise DataError(f"{path} is not a folder. Set dataset_dir to a folder of images or a dataset JSON file.")
    return path


def split_folder_datalist(
    root: str | os.PathLike,
    pattern: str = "*_{split}",
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
    exclude: str | None = r"(^|_)seg(_|$)",
    subject_pattern: str | None = DEFAULT_SUBJECT_PATTERN,
    val_fraction: float = 0.0,
    seed: int = 0,
) -> dict[str, list[dict]]:
    """Datalist of a folder holding one sub-folder per split.

    For example OASIS ``keras_png_slices_{train,validate,test}`` or HIPMRI ``keras_slices_{train,validate,test}``
    (2D ``.nii.gz`` slices). The ``{split}`` part of ``pattern`` matches ``train``/``training`` (training),
    ``validate``/``val``/``valid``/``validation`` (validation) and ``test``/``testing`` (test),
    case-insensitively. Segmentation folders (``*_seg_*``) are ignored by ``exclude``.

    Args:
        root: folder holding the split folders.
        pattern: glob for a split folder name with a ``{split}`` placeholder, e.g. ``"*_{split}"`` or ``"{split}"``.
        extensions: image file endings, matched case-insensitively.
        exclude: regex; split folders whose lower-case name matches it are ignored (``None``: none).
        subject_pattern: regex for the subject id of a file name (see :data:`DEFAULT_SUBJECT_PATTERN`).
        val_fraction: when above 0 and there is no validation folder, take this fraction of training
            (grouped by subject) as validation.
        seed: seed of that split.

    Raises:
        DataError: the folder is missing, no split folder matches, or no images are found.
    """
    path = _require_dir(root)
    dirs = _split_dirs(path, pattern, exclude)
    if not dirs:
        raise DataError(
            f"no split folders matching {pattern!r} (e.g. {pattern.format(split='train')}) in {path}. "
            "Check dataset_dir or the split folder pattern."
        )
    datalist = {
        section: [_item(f, subject_pattern) for f in list_images(folder, extensions)]
        for section, folder in dirs.items()
    }
    datalist = _drop_empty(datalist)
    if not datalist:
        names = ", ".join(d.name for d in dirs.values())
        raise DataError(f"no images found in the split folders ({names}) of {path}.")
    return _carve_validation(datalist, val_fraction, seed)


def _class_dirs(root: Path) -> tuple[dict[str, Path], list[str]]:
    splits = _split_dirs(root, "{split}")
    if not splits:
        raise DataError(
            f"no split folders (train/validate/test, any case) in {root}. "
            "A class-folder data set needs <split>/<class>/<images>."
        )
    classes = sorted(
        {c.name for folder in splits.values() for c in folder.iterdir() if c.is_dir() and not c.name.startswith(".")}
    )
    if not classes:
        raise DataError(f"no class folders inside the split folders of {root}. Expected <split>/<class>/<images>.")
    return splits, classes


def class_names(root: str | os.PathLike) -> list[str]:
    """Sorted class folder names of a class-folder data set; ``label`` of an item is the index in this list.

    Args:
        root: folder holding ``train``/``test`` (any case) folders, each with one folder per class.
    """
    return _class_dirs(_require_dir(root))[1]


def class_folder_datalist(
    root: str | os.PathLike,
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
    subject_pattern: str | None = DEFAULT_SUBJECT_PATTERN,
    val_fraction: float = 0.0,
    seed: int = 0,
) -> dict[str, list[dict]]:
    """Datalist of a ``<split>/<class>/<image>`` folder, e.g. ADNI ``AD_NC/{train,test}/{AD,NC}``.

    Split folders are matched case-insensitively (``Train``/``Test`` as in the Kaggle OASIS-derived data work).
    ``label`` is the index of the class folder name in the sorted union of class names over all splits;
    :func:`class_names` returns that list (e.g. ``["AD", "NC"]`` -> AD=0, NC=1).

    Args:
        root: folder holding the split folders.
        extensions: image file endings, matched case-insensitively.
        subject_pattern: regex for the subject id of a file name (see :data:`DEFAULT_SUBJECT_PATTERN`).
        val_fraction: when above 0 and there is no validation folder, take this fraction of training
            (grouped by subject) as validation.
        seed: seed of that split.

    Raises:
        DataError: the folder is missing, has no split or class folders, or no images.
    """
    path = _require_dir(root)
    splits, classes = _class_dirs(path)
    datalist: dict[str, list[dict]] = {}
    for section, folder in splits.items():
        items = []
        for label, name in enumerate(classes):
            class_dir = folder / name
            if class_dir.is_dir():
                items.extend(_item(f, subject_pattern, label) for f in list_images(class_dir, extensions))
        datalist[section] = items
    datalist = _drop_empty(datalist)
    if not datalist:
        raise DataError(f"no images found in the class folders of {path}.")
    return _carve_validation(datalist, val_fraction, seed)


def folder_datalist(
    root: str | os.PathLike,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
    subject_pattern: str | None = DEFAULT_SUBJECT_PATTERN,
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
    labels: Mapping[str, int] | None = None,
) -> dict[str, list[dict]]:
    """Datalist of every image under ``root`` (recursively), split by :func:`split_by_subject`.

    Args:
        root: folder of PNG/JPEG/NIfTI/... images, searched recursively.
        val_fraction: fraction of images for validation (0 allowed).
        test_fraction: fraction of images for test (0 allowed).
        seed: split seed; the same seed and files always give the same split.
        subject_pattern: regex for the subject id of a file name (see :data:`DEFAULT_SUBJECT_PATTERN`);
            files of one subject always land in the same section.
        extensions: image file endings, matched case-insensitively.
        labels: optional map from file name without image ending (e.g. ``"ISIC_0000000"``) to an int label.

    Raises:
        DataError: the folder is missing or holds no images.
    """
    path = _require_dir(root)
    files = list_images(path, extensions)
    if not files:
        exts = ", ".join(_extensions(extensions)[::-1])
        raise DataError(f"no images found in {path} (searched recursively for {exts}).")
    items = []
    for f in files:
        label = labels.get(_strip_extension(os.path.basename(f))) if labels is not None else None
        items.append(_item(f, subject_pattern, label))
    return split_by_subject(items, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)


def decathlon_datalist(
    json_path: str | os.PathLike, base_dir: str | os.PathLike | None = None
) -> dict[str, list[dict]]:
    """Datalist of a decathlon-style JSON file via :func:`monai.data.load_decathlon_datalist`.

    Each of the ``training``, ``validation`` and ``test`` sections present is loaded; relative paths are
    resolved against ``base_dir`` (default: the JSON file's folder). A string ``label`` (a segmentation) is
    resolved as a path, an int ``label`` is kept.

    Args:
        json_path: the JSON file.
        base_dir: folder the relative paths start from.

    Raises:
        DataError: the file is missing, is not valid JSON, or has no usable section.
    """
    path = Path(json_path).absolute()
    if not path.is_file():
        raise DataError(f"datalist file {path} does not exist. Set dataset_dir to a dataset JSON file or folder.")
    try:
        content = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: not a valid JSON file ({e}). Fix the file or point dataset_dir elsewhere.") from e
    if not isinstance(content, dict):
        raise DataError(f"{path}: expected a JSON object with {', '.join(SECTIONS)} lists.")
    datalist: dict[str, list[dict]] = {}
    for section in SECTIONS:
        if content.get(section):
            try:
                items = load_decathlon_datalist(path, is_segmentation=True, data_list_key=section, base_dir=base_dir)
            except (TypeError, ValueError) as e:
                raise DataError(f"{path}: cannot read section {section!r} ({e}).") from e
            datalist[section] = items
    if not datalist:
        raise DataError(f"{path}: no non-empty {', '.join(SECTIONS)} section. Add image entries to the file.")
    return datalist


def isic_labels(metadata_dir: str | os.PathLike) -> dict[str, int]:
    """Benign (0) / malignant (1) labels of ISIC images from the archive's metadata JSON files.

    Reads ``meta.clinical.benign_malignant`` of each ``*.json`` in ``metadata_dir``; images whose value is
    neither ``benign`` nor ``malignant`` (e.g. indeterminate or missing) get no label.

    Args:
        metadata_dir: folder of ``ISIC_*.json`` files.

    Returns:
        map from image name (``"ISIC_0000000"``) to 0 or 1.

    Raises:
        DataError: the folder is missing or a file is not valid JSON.
    """
    path = _require_dir(metadata_dir)
    labels: dict[str, int] = {}
    for file in sorted(path.glob("*.json")):
        try:
            content = json.loads(file.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(f"{file}: not a valid JSON file ({e}). Fix or remove the file.") from e
        clinical = (content.get("meta") or {}).get("clinical") or {} if isinstance(content, dict) else {}
        value = str(clinical.get("benign_malignant") or "").lower()
        if value in ("benign", "malignant"):
            labels[str(content.get("name") or file.stem)] = int(value == "malignant")
    return labels


def _has_class_folders(splits: Mapping[str, Path], extensions: Sequence[str]) -> bool:
    """Whether the split folders hold class sub-folders with images and no images of their own."""
    exts = _extensions(extensions)
    for folder in splits.values():
        entries = [e for e in folder.iterdir() if not e.name.startswith(".")]
        if any(e.is_file() and _has_extension(e.name, exts) for e in entries):
            return False
    return any(list_images(sub, extensions) for folder in splits.values() for sub in folder.iterdir() if sub.is_dir())


def detect_layout(dataset_dir: str | os.PathLike, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> tuple[str, Path]:
    """Detect the layout of a data set folder or file, as used by ``build_datalist(layout="auto")``.

    Checked in order: a ``*.json`` file, or a folder with ``dataset.json``/``datalist.json`` (decathlon);
    ``images/`` plus ``metadata/*.json`` (isic); split folders ``*_train`` etc. or ``train``/``test`` etc.
    holding class sub-folders (class) or images (split); a folder whose only entry is one sub-folder
    (descended into); any images below (folder).

    Args:
        dataset_dir: folder or JSON file.
        extensions: image file endings.

    Returns:
        the layout name and the path it applies to (which may be a sub-folder of ``dataset_dir``).

    Raises:
        DataError: the path is missing or nothing usable is found.
    """
    path = Path(dataset_dir).absolute()
    if not path.exists():
        raise DataError(f"dataset folder {path} does not exist. Set dataset_dir to a folder of images or a JSON file.")
    if path.is_file():
        if path.suffix.lower() == ".json":
            return "decathlon", path
        raise DataError(
            f"{path} is a file but not a JSON datalist. Set dataset_dir to a folder or a dataset JSON file."
        )
    for name in ("dataset.json", "datalist.json"):
        if (path / name).is_file():
            return "decathlon", path / name
    if (path / "images").is_dir() and (path / "metadata").is_dir() and any((path / "metadata").glob("*.json")):
        return "isic", path
    for pattern in ("*_{split}", "{split}"):
        splits = _split_dirs(path, pattern, exclude=r"(^|_)seg(_|$)")
        if splits and any(list_images(d, extensions) for d in splits.values()):
            if pattern == "{split}" and _has_class_folders(splits, extensions):
                return "class", path
            return "split", path
    entries = [e for e in path.iterdir() if not e.name.startswith(".")]
    if len(entries) == 1 and entries[0].is_dir():
        return detect_layout(entries[0], extensions)
    if list_images(path, extensions):
        return "folder", path
    exts = ", ".join(_extensions(extensions)[::-1])
    raise DataError(
        f"no images found in {path} (searched recursively for {exts}). Put images there or fix dataset_dir."
    )


def _call(fn: Callable, path: Path, kwargs: dict, strict: bool) -> dict[str, list[dict]]:
    params = inspect.signature(fn).parameters
    if not strict:
        kwargs = {k: v for k, v in kwargs.items() if k in params}
    return fn(path, **kwargs)


def build_datalist(dataset_dir: str | os.PathLike, layout: str = "auto", **kwargs) -> dict[str, list[dict]]:
    """Build a datalist from a data set folder or JSON file.

    Args:
        dataset_dir: folder of images or decathlon-style JSON file.
        layout: one of :data:`LAYOUTS`. ``"auto"`` uses :func:`detect_layout`; ``"decathlon"``,
            ``"split"``, ``"class"`` and ``"folder"`` call :func:`decathlon_datalist`,
            :func:`split_folder_datalist` (trying ``"*_{split}"`` then ``"{split}"`` unless ``pattern`` is given),
            :func:`class_folder_datalist` and :func:`folder_datalist`; ``"isic"`` calls :func:`folder_datalist`
            on ``images/`` with the labels of :func:`isic_labels` on ``metadata/``.
        kwargs: passed to the builder. Arguments the chosen builder does not take (e.g. ``test_fraction`` for a
            split-folder data set) are ignored, so one config can serve every layout; arguments that no builder
            takes raise ``TypeError``.

    Raises:
        DataError: the path is missing or holds nothing usable, with a message naming it.
        ValueError: unknown layout.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}.")
    strict = False
    path = Path(dataset_dir).absolute()
    builders = (decathlon_datalist, split_folder_datalist, class_folder_datalist, folder_datalist)
    known = {"extensions"}.union(*(inspect.signature(fn).parameters for fn in builders))
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise TypeError(f"build_datalist got arguments no layout takes: {', '.join(unknown)}.")
    if layout == "auto":
        layout, path = detect_layout(path, kwargs.get("extensions", IMAGE_EXTENSIONS))
    if layout == "decathlon":
        if path.is_dir():
            candidates = [path / n for n in ("dataset.json", "datalist.json") if (path / n).is_file()]
            path = candidates[0] if candidates else path / "dataset.json"
        return _call(decathlon_datalist, path, kwargs, strict)
    if layout == "isic":
        base = _require_dir(path)
        labels = isic_labels(base / "metadata")
        return _call(folder_datalist, base / "images", {**kwargs, "labels": labels}, strict)
    if layout == "split":
        if "pattern" in kwargs:
            return _call(split_folder_datalist, path, kwargs, strict)
        base = _require_dir(path)
        pattern = "*_{split}" if _split_dirs(base, "*_{split}", kwargs.get("exclude", r"(^|_)seg(_|$)")) else "{split}"
        return _call(split_folder_datalist, base, {**kwargs, "pattern": pattern}, strict)
    if layout == "class":
        return _call(class_folder_datalist, path, kwargs, strict)
    return _call(folder_datalist, path, kwargs, strict)
