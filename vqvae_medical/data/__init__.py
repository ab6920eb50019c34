"""Data module: datalists, input checks, MONAI transforms and the embedded MNI152 default data."""

from __future__ import annotations

from vqvae_medical.data.checks import (
    IMAGE_EXTENSIONS,
    CheckReport,
    DataError,
    ImageInfo,
    check_datalist,
    image_extension,
    inspect_image,
)
from vqvae_medical.data.datalists import (
    DEFAULT_SUBJECT_PATTERN,
    LAYOUTS,
    SECTIONS,
    SPLIT_ALIASES,
    build_datalist,
    class_folder_datalist,
    class_names,
    decathlon_datalist,
    detect_layout,
    folder_datalist,
    isic_labels,
    list_images,
    split_by_subject,
    split_folder_datalist,
    subject_id,
)
from vqvae_medical.data.embedded import (
    MNI152_T1_FILE,
    mni152_slices,
    mni152_volume_path,
    mni152_volumes,
)
from vqvae_medical.data.transforms import (
    AdaptChannelsd,
    SqueezeSpatialDimsd,
    ToRowMajord,
    image_transforms_2d,
    make_dataset,
    volume_transforms_3d,
)

__all__ = [
    "DEFAULT_SUBJECT_PATTERN",
    "IMAGE_EXTENSIONS",
    "LAYOUTS",
    "MNI152_T1_FILE",
    "SECTIONS",
    "SPLIT_ALIASES",
    "AdaptChannelsd",
    "CheckReport",
    "DataError",
    "ImageInfo",
    "SqueezeSpatialDimsd",
    "ToRowMajord",
    "build_datalist",
    "check_datalist",
    "class_folder_datalist",
    "class_names",
    "decathlon_datalist",
    "detect_layout",
    "folder_datalist",
    "image_extension",
    "image_transforms_2d",
    "inspect_image",
    "isic_labels",
    "list_images",
    "make_dataset",
    "mni152_slices",
    "mni152_volume_path",
    "mni152_volumes",
    "split_by_subject",
    "split_folder_datalist",
    "subject_id",
    "volume_transforms_3d",
]
