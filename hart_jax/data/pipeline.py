"""grain input pipelines over TFDS array_record data sources.

Elements (numpy, one example; ``Batch`` stacks them):
  ``image`` ``[R, R, 3]`` uint8 (shorter side resized to R with PIL bicubic, then a
  center or seeded random crop; optional seeded horizontal flip); ``id`` int64;
  text-to-image with cached embeddings: ``context`` ``[T, Dc]`` float32,
  ``context_mask`` ``[T]`` bool, ``context_position_ids`` ``[T]`` int32;
  text-to-image with prompts: ``input_ids`` / ``attention_mask`` ``[P + T]`` (the
  Qwen2 encoder inputs, prefix included), ``context_mask``, ``context_position_ids``;
  class-conditional: ``label`` int32; ``kind="image"`` (tokenizer training): ``image`` and
  ``id`` only, from any records. With ``codes`` (precomputed tokenizer outputs)
  ``codes`` ``[sum pn^2]`` int32 and ``last_layer_gt`` ``[hw, Cv]`` float32 replace ``image``.

Shuffling is grain's ``IndexSampler`` (deterministic by seed, endless epochs) over the
whole dataset, read through ``GlobalBatchSampler``: global batch ``b`` is positions
``[b*B, (b+1)*B)`` of that one order whatever the process count, and process ``p`` of
``P`` reads its rows ``[p*B/P, (p+1)*B/P)``, so several processes train on exactly the
batches one process would. Per-example randomness (crop, flip) comes from grain's
per-record RNG (seeded by the sampler seed and the record's global position in the
sampling order), so it depends neither on workers nor on the process count. ``id`` is the record's ``id`` feature (-1 without one). The loader's iterator state is what checkpoints save.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Mapping

import grain.python as grain
import jax
import numpy as np


def open_source(name: str = "", data_dir: str = "", split: str = "train", path: str = "") -> Any:
    """``tfds.data_source`` by ``name``/``data_dir``, or a dataset version directory ``path``."""
    import tensorflow_datasets as tfds

    if path:
        return tfds.builder_from_directory(path).as_data_source(split=split)
    if not name:
        raise ValueError("data: give data.name (+ data.data_dir) or data.path")
    check_source(name, data_dir)
    return tfds.data_source(name, data_dir=data_dir or None, split=split, download=False)


def tfds_data_dir(data_dir: str = "") -> Path:
    """``data_dir``, or TFDS's default (``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``)."""
    return Path(data_dir or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")).expanduser()


def datasets_in(data_dir: str | os.PathLike) -> list[str]:
    """Names of the TFDS datasets prepared under ``data_dir`` (``NAME[/CONFIG]/VERSION/dataset_info.json``)."""
    root = Path(data_dir)
    if not root.is_dir():
        return []
    return sorted({p.relative_to(root).parts[0] for p in root.glob("*/*/dataset_info.json")}
                  | {p.relative_to(root).parts[0] for p in root.glob("*/*/*/dataset_info.json")})


def check_source(name: str = "", data_dir: str = "", path: str = "") -> None:
    """One-line ``ValueError`` when ``path`` does not exist, or when dataset ``name`` is not
    prepared in ``data_dir`` (naming both and the datasets that are there), before TFDS
    would answer with its whole catalog."""
    if path:
        if not Path(path).exists():
            raise ValueError(f"data.path {path} does not exist")
        return
    if not name:
        return
    root = tfds_data_dir(data_dir)
    base = name.split(":")[0].split("/")[0]
    if not root.is_dir():
        raise ValueError(f"data.data_dir {root} does not exist (looking for dataset {name!r})")
    if not (root / base).is_dir():
        there = datasets_in(root)
        raise ValueError(
            f"dataset {name!r} not found in {root}; datasets there: {', '.join(there) if there else 'none'}"
        )


def resize_crop(image: np.ndarray, size: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """Shorter side -> ``size`` (PIL bicubic), then a center crop (random with ``rng``)."""
    from PIL import Image

    h, w = image.shape[:2]
    s = size / min(h, w)
    nh, nw = max(size, round(h * s)), max(size, round(w * s))
    pil = Image.fromarray(np.asarray(image, np.uint8))
    if (nh, nw) != (h, w):
        pil = pil.resize((nw, nh), Image.BICUBIC)
    if rng is None:
        top, left = (nh - size) // 2, (nw - size) // 2
    else:
        top, left = int(rng.integers(0, nh - size + 1)), int(rng.integers(0, nw - size + 1))
    return np.asarray(pil.crop((left, top, left + size, top + size)), np.uint8)


@dataclasses.dataclass
class Preprocess(grain.RandomMapTransform):
    """Record -> training example (see the module docstring)."""

    kind: str
    resolution: int
    context: str = "cached"  # "cached" | "prompt"
    seed: int = 0
    random_crop: bool = False
    random_flip: bool = False
    codes: bool = False
    tokenizer: Any = None
    prefix: str | None = None
    max_length: int = 300
    image_key: str = "image"
    caption_key: str = "caption"
    label_key: str = "label"

    def random_map(self, record: Mapping[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        out: dict[str, Any] = {"id": np.int64(record.get("id", -1))}
        if self.codes and self.kind != "image":
            if "codes" not in record:
                raise ValueError("data.codes=True needs records with 'codes' (make_records --tokenizer)")
            out["codes"] = np.asarray(record["codes"], np.int32)
            out["last_layer_gt"] = np.asarray(record["last_layer_gt"], np.float32)
        else:
            img = np.asarray(record[self.image_key])
            if img.ndim == 2:
                img = np.repeat(img[..., None], 3, axis=-1)
            img = resize_crop(img[..., :3], self.resolution, rng if self.random_crop else None)
            if self.random_flip and rng.random() < 0.5:
                img = img[:, ::-1]
            out["image"] = np.ascontiguousarray(img)
        if self.kind == "image":
            pass  # tokenizer training: image + id only (t2i or c2i records)
        elif self.kind == "c2i":
            out["label"] = np.int32(record[self.label_key])
        elif self.context == "cached":
            if "context" not in record:
                raise ValueError("data.context='cached' needs records with a 'context' feature (make_records --text-encoder)")
            out["context"] = np.asarray(record["context"], np.float32)
            out["context_mask"] = np.asarray(record["context_mask"], bool)
            out["context_position_ids"] = np.asarray(record["context_position_ids"], np.int32)
        elif self.context == "prompt":
            from hart_jax.prompts import tokenize_prompts

            cap = record[self.caption_key]
            cap = cap.decode("utf-8") if isinstance(cap, bytes) else str(cap)
            tok = tokenize_prompts(self.tokenizer, [cap], max_length=self.max_length, prefix=self.prefix)
            ids, mask = tok.encoder_inputs()
            out.update(
                input_ids=ids[0], attention_mask=mask[0], context_mask=tok.context_mask[0],
                context_position_ids=tok.context_position_ids[0],
            )
        else:
            raise ValueError(f"data.context must be 'cached' or 'prompt', got {self.context!r}")
        return out


class GlobalBatchSampler:
    """A grain sampler: this process's rows of each global batch of an unsharded
    ``grain.IndexSampler`` order (see the module docstring).

    Local position ``i`` (``k = i // b``, ``r = i % b``, ``b = B / P``) reads global
    position ``k * B + p * b + r``; the returned ``RecordMetadata`` (record key, RNG,
    ``index``) is the global sampler's at that position."""

    def __init__(
        self, num_records: int, global_batch: int, shard_index: int, shard_count: int, *, shuffle: bool, seed: int
    ):
        if global_batch % shard_count or not 0 <= shard_index < shard_count:
            raise ValueError(f"batch size {global_batch} does not split over {shard_count} processes")
        self._global = grain.IndexSampler(
            num_records=num_records, shard_options=grain.NoSharding(), shuffle=shuffle, num_epochs=None, seed=seed
        )
        self.global_batch, self.shard_index, self.shard_count = int(global_batch), int(shard_index), int(shard_count)
        self.local_batch = self.global_batch // self.shard_count

    def global_position(self, index: int) -> int:
        """The global sampling position of local position ``index``."""
        k, r = divmod(int(index), self.local_batch)
        return k * self.global_batch + self.shard_index * self.local_batch + r

    def __len__(self) -> int:
        return len(self._global)

    def __getitem__(self, index: int) -> Any:
        if index < 0:
            raise IndexError(f"negative sampler index {index}")
        return self._global[self.global_position(index)]

    def __repr__(self) -> str:  # grain checks it against the checkpointed iterator state
        return (
            f"GlobalBatchSampler({self._global!r}, global_batch={self.global_batch}, "
            f"shard_index={self.shard_index}, shard_count={self.shard_count})"
        )


def make_loader(
    dcfg: Mapping[str, Any],
    *,
    kind: str,
    resolution: int,
    global_batch: int,
    seed: int,
    tokenizer: Any = None,
    prefix: str | None = None,
    max_length: int = 300,
    source: Any = None,
    shard_index: int | None = None,
    shard_count: int | None = None,
) -> grain.DataLoader:
    """A grain ``DataLoader`` yielding this process's rows of each global batch
    (``global_batch / process_count`` of them, see ``GlobalBatchSampler``; the shard is this
    JAX process unless ``shard_index`` / ``shard_count`` say otherwise)."""
    nproc = jax.process_count() if shard_count is None else int(shard_count)
    pidx = jax.process_index() if shard_count is None else int(shard_index or 0)
    if global_batch % nproc:
        raise ValueError(f"batch size {global_batch} does not split over {nproc} processes")
    source = source if source is not None else open_source(
        dcfg.get("name", ""), dcfg.get("data_dir", ""), dcfg.get("split", "train"), dcfg.get("path", "")
    )
    per_host = global_batch // nproc
    if len(source) < global_batch:
        raise ValueError(f"the dataset has {len(source)} examples, fewer than one batch of {global_batch}")
    data_seed = int(dcfg.get("seed", -1))
    data_seed = seed if data_seed < 0 else data_seed
    sampler = GlobalBatchSampler(
        len(source), global_batch, pidx, nproc, shuffle=bool(dcfg.get("shuffle", True)), seed=data_seed
    )
    prep = Preprocess(
        kind=kind, resolution=resolution, context=dcfg.get("context", "cached"), seed=data_seed,
        random_crop=bool(dcfg.get("random_crop", False)), random_flip=bool(dcfg.get("random_flip", False)),
        codes=bool(dcfg.get("codes", False)),
        tokenizer=tokenizer, prefix=prefix, max_length=max_length,
        image_key=dcfg.get("image_key", "image"), caption_key=dcfg.get("caption_key", "caption"),
        label_key=dcfg.get("label_key", "label"),
    )
    return grain.DataLoader(
        data_source=source,
        sampler=sampler,
        shard_options=grain.NoSharding(),  # the sampler picks this process's rows
        operations=[prep, grain.Batch(per_host, drop_remainder=True)],
        worker_count=int(dcfg.get("worker_count", 0)),
        worker_buffer_size=int(dcfg.get("worker_buffer_size", 2)),
    )
