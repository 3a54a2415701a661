"""A user's class-per-folder image tree (data.name=imagefolder), listed first and decoded later in bounded chunks.

data.source/<class>/**/<image>: class index = position of the sorted folder name; every image is EXIF-oriented,
converted to RGB, center-cropped to a square and resized to data.image_size (LANCZOS). The split needs only
the labels, so the tree is listed without decoding; `decode_chunks` then decodes DECODE_CHUNK images at a time
in data.workers processes while the shard writer consumes them, so memory stays bounded (ImageNet does not fit).
An unreadable image fails the whole conversion with the file's name: a dataset that quietly lost files is
worse than a clear error.
"""
from __future__ import annotations

import hashlib
import os
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps
from tqdm.auto import tqdm

from biflow.config import DataConfig
from biflow.data.parts import DataError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
DECODE_CHUNK = 2048  # imagefolder images decoded, held and written at a time (bounds prepare's memory)
DECODE_TASK = 16  # images per task of the decoding processes


def _class_dirs(root: Path) -> list[Path]:
    if not root.is_dir():
        raise DataError(f"{root}: image folder not found (data.source)")
    dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not dirs:
        raise DataError(f"{root}: no class folders found; expected {root}/<class>/<image>")
    return dirs


def _image_files(class_dir: Path) -> list[Path]:
    files = sorted(
        p for p in class_dir.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    )
    if not files:
        raise DataError(f"{class_dir}: class folder has no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return files


def load_image(path: Path, size: int) -> np.ndarray:
    """One file -> uint8 (size, size, 3): EXIF-orient, RGB, center crop to square, LANCZOS resize."""
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im).convert("RGB")
            im = ImageOps.fit(im, (size, size), method=Image.Resampling.LANCZOS)
            return np.asarray(im, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise DataError(f"{path}: unreadable image ({err})") from None


@dataclass
class ImageFolder:
    """An imagefolder tree listed but not decoded: its images are decoded in chunks, when written."""

    files: list[Path]  # (N,) by class folder, sorted within one
    labels: np.ndarray  # int64 (N,)
    class_names: list[str]
    size: int  # output side S
    workers: int  # decoding processes

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.size, self.size, 3

    def chunks(self, idx: np.ndarray) -> Iterator[np.ndarray]:
        """The images of rows `idx`, in order, as uint8 (<= DECODE_CHUNK, S, S, 3) arrays."""
        return decode_chunks([self.files[i] for i in idx], self.size, self.workers)


def imagefolder_source(cfg: DataConfig) -> ImageFolder:
    """List cfg.source/<class>/**/<image> without decoding; class = index of the sorted folder name."""
    if not cfg.source:
        raise DataError("data.source is required for data.name=imagefolder (a class-per-folder image tree)")
    dirs = _class_dirs(Path(cfg.source).expanduser())
    files, labels = [], []
    for label, d in enumerate(dirs):
        found = _image_files(d)
        files += found
        labels += [label] * len(found)
    workers = cfg.workers or os.cpu_count() or 1
    return ImageFolder(files, np.asarray(labels, np.int64), [d.name for d in dirs], cfg.image_size, workers)


def decode_chunks(files: list[Path], size: int, workers: int) -> Iterator[np.ndarray]:
    """`load_image` over `files`, in order, as uint8 (<= DECODE_CHUNK, size, size, 3) arrays.

    Up to `workers` processes decode (no more than there are tasks of DECODE_TASK files; with one, this
    process does), one chunk ahead of the consumer: memory holds a few chunks, never the whole list.
    A tqdm bar on stderr (shown on a terminal) counts the images.
    """
    workers = min(workers, -(-len(files) // DECODE_TASK))
    pool = ProcessPoolExecutor(workers) if workers > 1 else None
    decode = partial(pool.map, chunksize=DECODE_TASK) if pool else map
    load = partial(load_image, size=size)
    bar = tqdm(total=len(files), desc="decoding images", unit="img", disable=None, leave=False)
    ahead: deque[Iterator[np.ndarray]] = deque()  # chunks submitted, not yet returned
    try:
        for lo in range(0, len(files), DECODE_CHUNK):
            ahead.append(decode(load, files[lo : lo + DECODE_CHUNK]))
            if len(ahead) == 2:
                yield _stack(ahead.popleft(), bar)
        while ahead:
            yield _stack(ahead.popleft(), bar)
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(cancel_futures=True)


def _stack(images: Iterator[np.ndarray], bar: tqdm) -> np.ndarray:
    """Decoded images (S, S, 3) -> (n, S, S, 3), counting them on `bar`."""
    out = []
    for image in images:
        out.append(image)
        bar.update()
    return np.stack(out)


def tree_fingerprint(root: Path) -> str:
    """sha256 of (relative path, size, mtime) of every file: changes when the tree does."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            p = Path(dirpath) / name
            st = p.stat()
            h.update(f"{p.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()
