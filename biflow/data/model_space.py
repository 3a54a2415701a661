"""Training data in model space: one prepared root as the flows see it, whatever its shards store.

    pixels   image shards (biflow.data.shards)           uint8 (N, H, W, C) -> float32 (N, C, H, W) in [-1, 1]
    latents  latent shards (biflow.data.latent_shards)   float16/32 (N, C, h, w) -> float32, as they are

Every consumer of training data goes through `TrainingData` and never asks which of the two it holds:
in-process training (`batches`), whole splits for evaluation (`tensors`), Ray Data rows on Ray Train
workers (`column`, `decode_rows`), and the provenance a checkpoint records (`record`). Its fields are plain
and picklable, so a Ray task or worker receives it as it is.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

Batch = tuple[torch.Tensor, torch.Tensor]  # (x float32 (B, C, H, W) in model space, y int64 (B,))


@dataclass(frozen=True)
class TrainingData:
    """A data root holding train/ and test/ splits of image or latent shards, local to this process."""

    root: str  # local directory with train/ and test/
    meta: dict[str, Any]  # the train split's manifest meta: image_shape [H, W, C] of a model-space sample, num_classes, ...
    content_hash: str  # the train split's content hash
    train_uri: str | None = None  # the train shards as Ray Data reads them (None: root/train)
    codec: dict[str, Any] | None = None  # latents: the VAE that made them (a LatentConfig dump), to decode samples
    image_dir: str | None = None  # latents: the image shards behind them (what evaluation compares samples with)
    image_hash: str | None = None  # latents: the content hash of those images' train split

    @classmethod
    def open(cls, root: str | Path, **fields: Any) -> TrainingData:
        """The data at `root`, its kind read from the train split's manifest (image or latent shards)."""
        from biflow.data.latent_shards import read_latent_manifest
        from biflow.data.shards import read_manifest

        train = Path(root) / "train"
        manifest = read_latent_manifest(train) if fields.get("codec") is not None else read_manifest(train)
        return cls(root=str(root), meta=manifest["meta"], content_hash=manifest["content_hash"], **fields)

    @property
    def latent(self) -> bool:
        return self.codec is not None

    @property
    def column(self) -> str:
        """The Parquet column of one sample."""
        return "latent" if self.latent else "image"

    @property
    def uri(self) -> str:
        return self.train_uri or str(Path(self.root) / "train")

    # ------------------------------------------------------------------ whole splits
    def stored(self, split: str) -> tuple[np.ndarray, np.ndarray, Callable[[torch.Tensor], torch.Tensor]]:
        """One split as stored: (samples, labels int64 (N,), to_model: stored rows -> float32 model space)."""
        if self.latent:
            from biflow.data.latent_shards import load_latent_split

            latents = load_latent_split(self.root, split)
            return latents.latents, latents.labels, lambda t: t.float()
        from biflow.data.builtin import load_split
        from biflow.data.transforms import to_model

        images = load_split(self.root, split)
        return images.images, images.labels, to_model

    def batches(self, split: str, batch_size: int, seed: int) -> Iterator[Batch]:
        """Endless shuffled (x, y) batches of one split held in memory (the `fit` batches contract)."""
        from biflow.data.transforms import shuffled_batches

        data, labels, to_model = self.stored(split)
        return shuffled_batches(data, labels, batch_size, seed, transform=to_model)

    def tensors(self, split: str) -> Batch:
        """A whole split in model space, in file order: (x float32 (N, C, H, W), y int64 (N,))."""
        data, labels, to_model = self.stored(split)
        return to_model(torch.from_numpy(np.ascontiguousarray(data))), torch.as_tensor(labels)

    # -------------------------------------------------------------- Ray Data rows
    def decode_rows(self, rows: dict[str, np.ndarray]) -> Batch:
        """A Ray Data numpy batch of this data's shard rows (columns `column` and `label`) -> (x, y) in model space."""
        if self.latent:
            from biflow.data.latent_shards import latents_from_rows

            return latents_from_rows(rows, self.meta)
        from biflow.data.transforms import to_model

        h, w, c = self.meta["image_shape"]
        x = np.frombuffer(bytearray(b"".join(rows["image"])), np.uint8).reshape(-1, h, w, c)  # (B, H, W, C)
        return to_model(x), torch.tensor(rows["label"], dtype=torch.long)

    # ------------------------------------------------------------------ provenance
    def record(self) -> dict[str, Any]:
        """What a checkpoint trained on this data records: the data evaluation compares samples with (images),
        and for latents the VAE that decodes samples and the latent shards themselves."""
        if not self.latent:
            return {"data_dir": self.root, "data_hash": self.content_hash}
        return {"latent": self.codec, "latent_dir": self.root, "latent_hash": self.content_hash,
                "data_dir": self.image_dir, "data_hash": self.image_hash}
