"""Training samples: (image, class-index mask) pairs, random crops, normalisation.

Conventions: images are HxWx3 uint8 RGB; masks are HxW uint8 class indices with
0 = background and k = the k-th label (1-based) of the label map.

A sample is held in memory (`Sample`) or on disk (`StoredSample`, written by a `SampleStore`):
the backend's training runs store every task's decoded image and mask as .npy files and read
only the crop it needs (memory-mapped), so memory does not grow with the number of tasks.
Both kinds give the same crops for the same random numbers.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image

from backends.errors import ImageUnavailable
from backends.images.decode import allow_pixels, decode_image
from backends.label_studio.annotations import newest_annotation
from segmentation.augment import apply
from segmentation.normalization import PER_IMAGE, Normalization

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
LOCAL_MAX_PIXELS = 120_000_000  # image files read from a folder: IMAGE_MAX_MEGAPIXELS's default


@dataclass(frozen=True)
class Sample:
    """One labelled image. `image` HxWx3 uint8 RGB, `mask` HxW uint8 class indices."""

    name: str
    image: np.ndarray
    mask: np.ndarray

    def __post_init__(self) -> None:
        if self.image.ndim != 3 or self.image.shape[2] != 3 or self.image.dtype != np.uint8:
            raise ValueError(f"{self.name}: image must be HxWx3 uint8, got {self.image.shape} {self.image.dtype}")
        if self.mask.shape != self.image.shape[:2]:
            raise ValueError(f"{self.name}: mask {self.mask.shape} does not match image {self.image.shape[:2]}")

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width)."""
        return self.mask.shape

    @functools.cached_property
    def foreground(self) -> ForegroundIndex:
        return ForegroundIndex.of(self.mask)


@dataclass(frozen=True)
class ForegroundIndex:
    """Where a mask's foreground classes are, in O(height) memory per class.

    classes: the foreground class indices present, ascending.
    row_ends: class -> (H,) int64, the number of that class's pixels in rows 0..r (inclusive).
    """

    classes: tuple[int, ...]
    row_ends: dict[int, np.ndarray] = field(repr=False)

    @classmethod
    def of(cls, mask: np.ndarray, block_rows: int = 256) -> ForegroundIndex:
        """Index an HxW uint8 mask, a block of rows at a time (no full-size temporaries)."""
        height = mask.shape[0]
        present = np.zeros(256, np.int64)
        for top in range(0, height, block_rows):
            present += np.bincount(np.asarray(mask[top : top + block_rows]).ravel(), minlength=256)
        classes = tuple(int(c) for c in np.flatnonzero(present) if c != 0)
        per_row = {c: np.zeros(height, np.int64) for c in classes}
        for top in range(0, height, block_rows):
            block = np.asarray(mask[top : top + block_rows])
            for c in classes:
                per_row[c][top : top + block.shape[0]] = np.count_nonzero(block == c, axis=1)
        return cls(classes, {c: np.cumsum(counts) for c, counts in per_row.items()})

    def pixel(self, mask: np.ndarray, class_index: int, pick: int) -> tuple[int, int]:
        """(row, column) of the pick-th pixel (row-major, from 0) of `class_index` in `mask`:
        the same pixel as `np.nonzero(mask == class_index)[.][pick]`, reading one row."""
        ends = self.row_ends[class_index]
        row = int(np.searchsorted(ends, pick, side="right"))
        before = int(ends[row - 1]) if row else 0
        column = int(np.flatnonzero(np.asarray(mask[row]) == class_index)[pick - before])
        return row, column

    def count(self, class_index: int) -> int:
        return int(self.row_ends[class_index][-1])


@dataclass(frozen=True)
class StoredSample:
    """A labelled image kept on disk as two .npy files (see SampleStore); `image` and `mask`
    memory-map them on each access, so only the parts read come into memory."""

    name: str
    image_path: Path
    mask_path: Path
    shape: tuple[int, int]
    foreground: ForegroundIndex = field(repr=False)

    @property
    def image(self) -> np.ndarray:
        """HxWx3 uint8 (read-only, memory-mapped)."""
        return np.load(self.image_path, mmap_mode="r")

    @property
    def mask(self) -> np.ndarray:
        """HxW uint8 (read-only, memory-mapped)."""
        return np.load(self.mask_path, mmap_mode="r")


AnySample = Sample | StoredSample


class SampleStore:
    """Writes samples as .npy files under `directory` (created; the caller removes it): about
    4 bytes of disk per pixel, and none of memory once written."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._written = 0

    def add(self, name: str, image: np.ndarray, mask: np.ndarray) -> StoredSample:
        """Check (as Sample does) and store one pair; the arrays may be dropped afterwards."""
        Sample(name, image, mask)  # the same checks
        index = self._written
        self._written += 1
        # File names are counters: task data never becomes a path.
        image_path, mask_path = self.directory / f"{index}-image.npy", self.directory / f"{index}-mask.npy"
        np.save(image_path, np.ascontiguousarray(image))
        np.save(mask_path, np.ascontiguousarray(mask))
        return StoredSample(name, image_path, mask_path, tuple(mask.shape), ForegroundIndex.of(mask))


def normalize(image: np.ndarray) -> np.ndarray:
    """HxWx3 uint8 -> 3xHxW float32, standardised per image (zero mean, unit variance).

    Per-image statistics make fluorescence (dark background) and bright-field images
    look alike to the network, which matters when only a few examples are labelled.
    """
    pixels = image.astype(np.float32).transpose(2, 0, 1)
    return (pixels - pixels.mean()) / max(float(pixels.std()), 1.0)


def pad_to_at_least(image: np.ndarray, mask: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Reflect-pad image (HxWx3) and mask (HxW) at the bottom/right so both sides are >= size."""
    height, width = mask.shape
    pad_h, pad_w = max(0, size - height), max(0, size - width)
    if not (pad_h or pad_w):
        return image, mask
    # Reflection needs the pad to be smaller than the side; "symmetric" repeats as often as needed.
    mode: Literal["reflect", "symmetric"] = "reflect" if pad_h < height and pad_w < width else "symmetric"
    image = np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)), mode=mode)
    mask = np.pad(mask, ((0, pad_h), (0, pad_w)), mode=mode)
    return image, mask


def random_crop(
    image: np.ndarray, mask: np.ndarray, size: int, rng: random.Random, foreground_bias: float = 0.5
) -> tuple[np.ndarray, np.ndarray]:
    """A size x size crop of (HxWx3 image, HxW mask), padded first when smaller.

    With probability `foreground_bias` the crop is centred near a random labelled pixel of a
    random present class, so rare classes are seen often even in few, large images.
    """
    image, mask = pad_to_at_least(image, mask, size)
    top, left = _crop_origin(mask, ForegroundIndex.of(mask), size, rng, foreground_bias)
    return image[top : top + size, left : left + size], mask[top : top + size, left : left + size]


def crop_sample(
    sample: AnySample, size: int, rng: random.Random, foreground_bias: float = 0.5
) -> tuple[np.ndarray, np.ndarray]:
    """`random_crop` of a Sample or StoredSample (same crop for the same `rng` state), reading
    only the crop (and one mask row) when the sample is at least `size` on both sides."""
    height, width = sample.shape
    if height < size or width < size:  # padded first: a small image, read whole
        return random_crop(np.asarray(sample.image), np.asarray(sample.mask), size, rng, foreground_bias)
    mask = sample.mask
    top, left = _crop_origin(mask, sample.foreground, size, rng, foreground_bias)
    rows, cols = slice(top, top + size), slice(left, left + size)
    return np.array(sample.image[rows, cols]), np.array(mask[rows, cols])


def _crop_origin(
    mask: np.ndarray, foreground: ForegroundIndex, size: int, rng: random.Random, foreground_bias: float
) -> tuple[int, int]:
    """Top-left corner of a size x size crop of an HxW mask (H, W >= size); see `random_crop`."""
    height, width = mask.shape
    classes = list(foreground.classes)
    if classes and rng.random() < foreground_bias:
        class_index = rng.choice(classes)
        row, column = foreground.pixel(mask, class_index, rng.randrange(foreground.count(class_index)))
        top = row - size // 2 + rng.randint(-size // 4, size // 4)
        left = column - size // 2 + rng.randint(-size // 4, size // 4)
    else:
        top, left = rng.randint(0, height - size), rng.randint(0, width - size)
    return min(max(top, 0), height - size), min(max(left, 0), width - size)


class CropDataset(torch.utils.data.Dataset):
    """Random augmented crops from `samples`; one epoch = `length` crops.

    Items: (3xSxS float32 normalised image, 1xSxS int64 class indices), S = crop_size.
    `normalization`: the network's (per image: each crop by its own statistics, as before).
    """

    def __init__(
        self,
        samples: Sequence[AnySample],
        crop_size: int,
        length: int,
        augment: Callable | None = None,
        seed: int = 0,
        normalization: Normalization = PER_IMAGE,
    ):
        if not samples:
            raise ValueError("no training samples")
        self.normalization = normalization
        self.samples = list(samples)
        self.crop_size = crop_size
        self.length = length
        self.augment = augment
        self.rng = random.Random(seed)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        sample = self.samples[self.rng.randrange(len(self.samples))]
        image, mask = crop_sample(sample, self.crop_size, self.rng)
        image, mask = apply(self.augment, np.ascontiguousarray(image), np.ascontiguousarray(mask))
        pixels = normalize(image) if self.normalization.per_image else self.normalization.apply(image)
        return torch.from_numpy(pixels), torch.from_numpy(mask[None].astype(np.int64))


def split_samples(
    samples: Sequence[AnySample], val_fraction: float, seed: int = 0
) -> tuple[list[AnySample], list[AnySample]]:
    """Held-out split: (train, validation). At least one sample is always kept for training;
    validation is empty when there are fewer than 2 samples or val_fraction <= 0."""
    order = list(samples)
    random.Random(seed).shuffle(order)
    if len(order) < 2 or val_fraction <= 0:
        return order, []
    n_val = min(max(round(len(order) * val_fraction), 1), len(order) - 1)
    return order[n_val:], order[:n_val]


def read_image(path: Path, max_pixels: int = LOCAL_MAX_PIXELS) -> np.ndarray:
    """An image file -> HxWx3 uint8 RGB, decoded as the backends decode fetched images (EXIF
    orientation applied, as Label Studio shows it; 16-bit and float grey scaled by their range).

    Raises OSError when the file cannot be read, ValueError when it is not a readable image or
    has more than `max_pixels` pixels.
    """
    allow_pixels(max_pixels)
    try:
        return decode_image(Path(path).read_bytes(), max_pixels, name=Path(path).name)
    except ImageUnavailable as error:
        raise ValueError(error.message) from None


def read_mask(path: Path) -> np.ndarray:
    """A class-index PNG -> HxW uint8 (pixel value k = k-th label, 0 = background)."""
    with Image.open(path) as opened:
        mask = np.array(opened)
    if mask.ndim == 3:
        raise ValueError(f"{path.name}: mask has {mask.shape[2]} channels; expected a single-channel class-index PNG")
    if mask.max(initial=0) > 255:
        raise ValueError(f"{path.name}: mask value {int(mask.max())} does not fit a class index (0..255)")
    return mask.astype(np.uint8)


def image_files(directory: Path) -> dict[str, Path]:
    """stem -> path for the image files directly inside `directory`."""
    return {
        path.stem: path
        for path in sorted(Path(directory).iterdir())
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES
    }


def pair_files(images_dir: Path, masks_dir: Path) -> tuple[list[tuple[Path, Path]], list[str]]:
    """Match images with same-stem PNG masks: ([(image, mask), ...], problems).

    `problems` names every image without a mask and every mask without an image.
    """
    images = image_files(images_dir)
    masks = {stem: path for stem, path in image_files(masks_dir).items() if path.suffix.lower() == ".png"}
    problems = [
        f"image {images[s].name} has no mask {s}.png in {masks_dir}" for s in sorted(images.keys() - masks.keys())
    ]
    problems += [
        f"mask {masks[s].name} has no image with stem {s!r} in {images_dir}"
        for s in sorted(masks.keys() - images.keys())
    ]
    pairs = [(images[s], masks[s]) for s in sorted(images.keys() & masks.keys())]
    return pairs, problems


def load_pair(image_path: Path, mask_path: Path, n_labels: int) -> Sample:
    """Read one (image, mask) pair; raises ValueError saying what is wrong with it."""
    image, mask = read_image(image_path), read_mask(mask_path)
    if mask.shape != image.shape[:2]:
        raise ValueError(
            f"{mask_path.name}: mask is {mask.shape[1]}x{mask.shape[0]} but image {image_path.name} "
            f"is {image.shape[1]}x{image.shape[0]} (width x height)"
        )
    if int(mask.max(initial=0)) > n_labels:
        raise ValueError(f"{mask_path.name}: pixel value {int(mask.max())} but only {n_labels} labels are known")
    return Sample(name=image_path.stem, image=image, mask=mask)


# -- Label Studio annotations -> samples ----------------------------------------------------------


def samples_from_tasks(
    tasks: Sequence[dict],
    image_key: str,
    output_names: Sequence[str],
    label_map: dict[str, int],
    load_pixels: Callable[[str, int | None], np.ndarray],
    store: SampleStore | None = None,
    max_polygon_vertices: int = 10_000,
) -> tuple[list[AnySample], list[str]]:
    """Turn Label Studio tasks (export JSON: data + annotations) into training samples.

    image_key: the task data key of the Image tag; output_names: the `from_name`s of its brush /
    polygon tags; label_map: label -> class index (1-based). `load_pixels(uri, task_id)` returns
    HxWx3 uint8. Uses the newest non-cancelled annotation per task; brush RLE is decoded and
    polygons rasterised by backends.label_studio.regions (overlaps: the later region wins). Tasks that cannot
    be used (no annotation, unfetchable image, no usable region) are skipped: returns
    (samples, problems), one readable line per skipped task or region. With a `store`, each
    sample is written to disk as soon as it is made (StoredSample): one image in memory at a time.
    """
    from backends.errors import BackendError
    from backends.label_studio.regions import results_to_class_mask

    samples: list[AnySample] = []
    problems: list[str] = []
    for task in tasks:
        task_id = task.get("id")
        annotation = newest_annotation(task.get("annotations"))
        if annotation is None:
            continue  # unlabelled (or only cancelled) tasks are simply not training data
        uri = (task.get("data") or {}).get(image_key)
        if not isinstance(uri, str):
            problems.append(f"task {task_id}: no image under data.{image_key}, skipped")
            continue
        results = [
            r for r in annotation.get("result") or [] if isinstance(r, dict) and r.get("from_name") in output_names
        ]
        try:
            pixels = load_pixels(uri, task_id)
        except BackendError as error:
            problems.append(f"task {task_id}: {error.message}, skipped")
            continue
        height, width = pixels.shape[:2]
        mask, warnings = results_to_class_mask(
            results, label_map, height, width, overlap="later", max_polygon_vertices=max_polygon_vertices
        )
        problems.extend(f"task {task_id}: {warning}" for warning in warnings)
        # A submitted annotation with no regions says "all background", a valid lesson; regions
        # that all turned out unusable (unknown labels, corrupt masks) say nothing.
        if annotation.get("result") and not mask.any():
            problems.append(f"task {task_id}: annotation {annotation.get('id')} has no usable region, skipped")
            continue
        name = f"task-{task_id}"
        samples.append(
            store.add(name, pixels, mask) if store is not None else Sample(name=name, image=pixels, mask=mask)
        )
        del pixels, mask
    return samples, problems
