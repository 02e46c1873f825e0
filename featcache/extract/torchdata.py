"""A user's torch data, for the Python API: a Dataset or a DataLoader over one, as one split.

Samples are what torchvision's data sets give: an image tensor (C, H, W), or a sequence whose
first item is the image and whose second is the integer label. Rows are written in the data set's
order, so a DataLoader must not shuffle (its sampler must be sequential); it is re-created over
the rows still to extract with the same workers, collate function and pinned memory, so that an
interrupted extraction resumes where it stopped. Sample ids are the row numbers "0", "1", ...
"""

from __future__ import annotations

import functools
import hashlib

import numpy as np
import torch

from featcache.errors import FeatcacheError


class TorchSplit:
    """One split's data from a torch Dataset or DataLoader (see the module docstring)."""

    def __init__(self, data, name: str):
        from torch.utils.data import DataLoader, IterableDataset, SequentialSampler

        self.name = name
        self.where = f"split {name!r}"
        self.loader_options: dict = {}
        if isinstance(data, DataLoader):
            if not isinstance(data.sampler, SequentialSampler):
                raise FeatcacheError(f"{self.where}: its DataLoader must keep the data set's order (shuffle=False, "
                                     f"no sampler), got {type(data.sampler).__name__}")
            if data.batch_size is None:
                raise FeatcacheError(f"{self.where}: its DataLoader has batch_size=None (no batching); give it a "
                                     "batch size, or pass the data set itself")
            self.loader_options = {"num_workers": data.num_workers, "collate_fn": data.collate_fn,
                                   "worker_init_fn": data.worker_init_fn, "generator": data.generator,
                                   "timeout": data.timeout, "pin_memory": data.pin_memory}
            if data.num_workers > 0:
                self.loader_options |= {"persistent_workers": data.persistent_workers,
                                        "multiprocessing_context": data.multiprocessing_context,
                                        "prefetch_factor": data.prefetch_factor}
            data = data.dataset
        if isinstance(data, IterableDataset) or not (hasattr(data, "__getitem__") and hasattr(data, "__len__")):
            raise FeatcacheError(f"{self.where}: expected a map-style torch Dataset (with __len__ and __getitem__) "
                                 f"or a DataLoader over one, got {type(data).__name__}")
        self.dataset = data
        self.n = len(data)
        if self.n == 0:
            raise FeatcacheError(f"{self.where}: the data set is empty")
        self.ids = np.array([str(i) for i in range(self.n)])

    def __len__(self):
        return self.n

    def subset(self, lo: int, hi: int) -> "TorchSplit":
        raise FeatcacheError(f"{self.where}: sharding is not available for in-memory data sets")

    def _sample_image(self, index: int) -> torch.Tensor:
        item = self.dataset[index]
        image = item[0] if isinstance(item, (tuple, list)) else item
        if not isinstance(image, torch.Tensor):
            hint = " (add torchvision.transforms.ToTensor() to its transform)" if type(image).__module__.startswith("PIL") else ""
            raise FeatcacheError(f"{self.where}: sample {index} gives a {type(image).__name__}, not an image "
                                 f"tensor{hint}")
        if image.ndim != 3:
            raise FeatcacheError(f"{self.where}: sample {index} has shape {tuple(image.shape)}; expected (C, H, W)")
        if not image.is_floating_point():
            raise FeatcacheError(f"{self.where}: sample {index} is a {str(image.dtype).removeprefix('torch.')} tensor; "
                                 "the network takes floating-point images (e.g. transforms.ToTensor(), or v2.ToImage() "
                                 "with v2.ToDtype(torch.float32, scale=True))")
        return image

    @functools.cached_property
    def _first(self) -> torch.Tensor:
        return self._sample_image(0)

    def first(self) -> torch.Tensor:
        """The first image, as a batch of one (read once: every check and the resume key use it)."""
        return self._first[None].float()

    def identity(self) -> dict:
        """What the resume key knows of the data: its type, length, and the first and last images' bytes.

        In-memory data has no file to name; a changed transform or data set almost always changes
        these, and sample ids are row numbers, so this is what tells one data set from another.
        """
        digest = hashlib.sha256()
        for image in (self._first, self._sample_image(self.n - 1)) if self.n > 1 else (self._first,):
            digest.update(image.detach().cpu().float().contiguous().numpy().tobytes())
        kind = type(self.dataset)
        collate = self.loader_options.get("collate_fn")
        return {"python": f"{kind.__module__}.{kind.__qualname__}", "n": self.n, "images_sha256": digest.hexdigest(),
                "collate": None if collate is None else f"{getattr(collate, '__module__', '')}."
                                                        f"{getattr(collate, '__qualname__', type(collate).__name__)}"}

    def describe(self) -> dict:
        """The split's entry in the root attribute `preprocessing`."""
        kind = type(self.dataset)
        transform = getattr(self.dataset, "transform", None)
        return {"source": {"python": f"{kind.__module__}.{kind.__qualname__}"}, "size": self.n,
                "transform": None if transform is None else repr(transform)}

    def batches(self, start: int, stop: int, step: int, pin_memory: bool = False):
        """(start, stop, images, labels) for rows start..stop, `step` rows at a time."""
        from torch.utils.data import DataLoader, Subset

        options = {"pin_memory": pin_memory, **self.loader_options}
        loader = DataLoader(Subset(self.dataset, range(start, stop)), batch_size=step, shuffle=False, **options)
        a = start
        try:
            for batch in loader:
                images, labels = self._unpack(batch, a)
                yield a, a + len(images), images, labels
                a += len(images)
        except FeatcacheError:
            raise
        except Exception as exc:
            # a worker's error arrives with its whole traceback in the message: its last line says it
            lines = [line for line in str(exc).strip().splitlines() if line.strip()]
            raise FeatcacheError(f"{self.where}: reading rows from {a}: {type(exc).__name__}: "
                                 f"{lines[-1].strip() if lines else ''}") from exc

    def _unpack(self, batch, start: int):
        images, labels = (batch[0], batch[1] if len(batch) > 1 else None) if isinstance(batch, (tuple, list)) else (batch, None)
        if not isinstance(images, torch.Tensor) or images.ndim != 4:
            raise FeatcacheError(f"{self.where}: rows from {start} do not collate into an image batch (N, C, H, W)")
        if not images.is_floating_point():
            raise FeatcacheError(f"{self.where}: rows from {start} collate into {str(images.dtype).removeprefix('torch.')} "
                                 "images; the network takes floating-point images")
        if labels is None:
            labels = np.full(len(images), -1, np.int64)
        else:
            labels = np.asarray(labels.cpu().numpy() if isinstance(labels, torch.Tensor) else labels)
            if labels.shape != (len(images),) or labels.dtype.kind not in "iu":
                raise FeatcacheError(f"{self.where}: rows from {start}: labels must be one integer per image, "
                                     f"got {labels.dtype} {labels.shape}")
        return images.float(), labels.astype(np.int64)
