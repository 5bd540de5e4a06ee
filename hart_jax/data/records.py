"""Write image datasets in the TFDS array_record format (readable with ``tfds.data_source``
without TensorFlow).

Features of a text-to-image dataset: ``image`` (encoded JPEG/PNG), ``caption`` (text),
``id`` (int64, position in the source listing) and, with cached embeddings, ``context``
``[T, Dc]`` (float16 by default), ``context_mask`` ``[T]`` bool, ``context_position_ids``
``[T]`` int32. A class-conditional dataset has ``image``, ``label`` (int64) and ``id``,
the fields of TFDS's ``imagenet2012`` that the pipeline reads.

Images are stored as their original file bytes when they are RGB JPEG/PNG, otherwise
re-encoded to PNG; decoding (PIL) happens when a record is read.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import numpy as np

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
DEFAULT_VERSION = "1.0.0"


def encode_image(image: Any) -> bytes:
    """RGB JPEG/PNG bytes of an image given as a path, encoded bytes, a PIL image or a
    ``[H, W, 3]`` uint8 array (original bytes are kept when already RGB JPEG/PNG)."""
    from PIL import Image

    raw = None
    if isinstance(image, (str, os.PathLike)):
        raw = Path(image).read_bytes()
    elif isinstance(image, bytes):
        raw = image
    if raw is not None:
        try:
            pil = Image.open(io.BytesIO(raw))
            pil.load()
        except Exception as e:
            raise ValueError(f"cannot decode image {image if not isinstance(image, bytes) else '<bytes>'}: {e}") from None
        if pil.mode == "RGB" and pil.format in ("JPEG", "PNG"):
            return raw
    elif isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
            raise ValueError(f"image arrays must be [H, W, 3] uint8, got {image.shape} {image.dtype}")
        pil = Image.fromarray(image)
    else:
        pil = image
    buf = io.BytesIO()
    pil.convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


def _features(kind: str, context_shape, context_dtype: str, num_classes: int | None, codes_shape=None):
    import tensorflow_datasets as tfds

    feats: dict[str, Any] = {"image": tfds.features.Image(shape=(None, None, 3)), "id": np.int64}
    if codes_shape is not None:
        n, hw, cv = (int(x) for x in codes_shape)
        feats["codes"] = tfds.features.Tensor(shape=(n,), dtype=np.int32)
        feats["last_layer_gt"] = tfds.features.Tensor(shape=(hw, cv), dtype=np.float32)
    if kind == "t2i":
        feats["caption"] = tfds.features.Text()
        if context_shape is not None:
            t = int(context_shape[0])
            feats["context"] = tfds.features.Tensor(shape=tuple(int(s) for s in context_shape), dtype=np.dtype(context_dtype))
            feats["context_mask"] = tfds.features.Tensor(shape=(t,), dtype=np.bool_)
            feats["context_position_ids"] = tfds.features.Tensor(shape=(t,), dtype=np.int32)
    elif kind == "c2i":
        feats["label"] = tfds.features.ClassLabel(num_classes=int(num_classes)) if num_classes else np.int64
    else:
        raise ValueError(f"kind must be 't2i' or 'c2i', got {kind!r}")
    return tfds.features.FeaturesDict(feats)


def write_records(
    out_dir: str | os.PathLike,
    examples: Iterable[Mapping[str, Any]],
    *,
    name: str = "hart_images",
    kind: str = "t2i",
    split: str = "train",
    context_shape: tuple[int, int] | None = None,
    context_dtype: str = "float16",
    num_classes: int | None = None,
    codes_shape: tuple[int, int, int] | None = None,
    num_shards: int | None = None,
) -> Path:
    """Write ``examples`` (dicts with ``image`` and ``caption`` / ``label``, optionally
    ``context``, ``context_mask``, ``context_position_ids``; with ``codes_shape``
    ``(sum pn^2, hw, Cv)`` also the tokenizer's ``codes`` and ``last_layer_gt``) as a TFDS array_record
    dataset ``out_dir/name/1.0.0``; returns that directory. ``id`` defaults to the
    running index. Refuses an existing dataset directory."""
    import tensorflow_datasets as tfds

    out_dir = Path(out_dir)
    final = out_dir / name / DEFAULT_VERSION
    if final.exists():
        raise FileExistsError(f"{final} already exists; remove it or choose another name")
    features = _features(kind, context_shape, context_dtype, num_classes, codes_shape)
    cdtype = np.dtype(context_dtype)

    def gen() -> Iterator[tuple[int, dict[str, Any]]]:
        for i, ex in enumerate(examples):
            if "image" not in ex:
                raise ValueError(f"example {i} has no 'image'")
            row: dict[str, Any] = {"image": encode_image(ex["image"]), "id": int(ex.get("id", i))}
            if codes_shape is not None:
                row["codes"] = np.asarray(ex["codes"], np.int32).reshape(codes_shape[0])
                row["last_layer_gt"] = np.asarray(ex["last_layer_gt"], np.float32).reshape(codes_shape[1:])
            if kind == "t2i":
                row["caption"] = str(ex.get("caption", ""))
                if context_shape is not None:
                    ctx = np.asarray(ex["context"])
                    if ctx.shape != tuple(context_shape):
                        raise ValueError(f"example {i}: context has shape {ctx.shape}, expected {tuple(context_shape)}")
                    row["context"] = ctx.astype(cdtype)
                    t = context_shape[0]
                    row["context_mask"] = np.asarray(ex.get("context_mask", np.ones(t, bool)), bool)
                    default_pos = np.cumsum(row["context_mask"]) - 1
                    row["context_position_ids"] = np.asarray(ex.get("context_position_ids", default_pos), np.int32)
            else:
                if "label" not in ex:
                    raise ValueError(f"example {i} has no 'label'")
                row["label"] = int(ex["label"])
            yield i, row

    class _Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version(DEFAULT_VERSION)
        code_path = None  # no source-tree metadata (checksums, citations) for an ad-hoc dataset

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=features, description="written by hart_jax.data.records")

        def _split_generators(self, dl_manager):
            return {split: gen()}

        def _generate_examples(self):  # pragma: no cover - splits come from _split_generators
            raise NotImplementedError

    _Builder.name = name
    _Builder.__name__ = f"HartRecords_{name}"
    builder = _Builder(data_dir=str(out_dir), file_format="array_record")
    cfg = tfds.download.DownloadConfig(num_shards=num_shards) if num_shards else None
    builder.download_and_prepare(download_config=cfg)
    return final


def scan_image_dir(root: str | os.PathLike, kind: str = "t2i") -> tuple[list[dict[str, Any]], list[str]]:
    """List a directory as examples.

    ``t2i``: every image file (recursively) with its caption from ``<stem>.txt`` next to
    it (an image without a caption file is an error). ``c2i``: ImageNet layout, one
    sub-directory per class (sorted names -> labels 0..); returns the class names too.
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root}: not a directory")
    classes: list[str] = []
    examples: list[dict[str, Any]] = []
    if kind == "t2i":
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        missing = [str(p) for p in files if not p.with_suffix(".txt").is_file()]
        if missing:
            raise ValueError(f"{len(missing)} images have no caption file (<stem>.txt), e.g. {missing[0]}")
        for p in files:
            examples.append({"image": p, "caption": p.with_suffix(".txt").read_text().strip()})
    elif kind == "c2i":
        classes = sorted(d.name for d in root.iterdir() if d.is_dir())
        if not classes:
            raise ValueError(f"{root}: no class sub-directories (ImageNet layout: ROOT/<class>/<image>)")
        for label, c in enumerate(classes):
            for p in sorted((root / c).rglob("*")):
                if p.suffix.lower() in IMAGE_SUFFIXES:
                    examples.append({"image": p, "label": label})
    else:
        raise ValueError(f"kind must be 't2i' or 'c2i', got {kind!r}")
    if not examples:
        raise ValueError(f"{root}: no images found ({', '.join(IMAGE_SUFFIXES)})")
    return examples, classes
