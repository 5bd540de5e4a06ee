"""Directory of images (+ captions) -> TFDS array_record dataset.

    python -m hart_jax.data.make_records IMAGES_DIR OUT_DIR [--name NAME] [--kind t2i|c2i]
        [--text-encoder CONVERTED_QWEN_DIR [--context-dtype float16]]
        [--tokenizer CONVERTED_TOKENIZER_DIR [--patch-nums 1,2,...,64]] [--batch-size 8]

``t2i``: every image with a ``<stem>.txt`` caption beside it. ``c2i``: ImageNet layout
(``IMAGES_DIR/<class>/<image>``; labels are the sorted class names' positions, written
to ``OUT_DIR/NAME/classes.txt``). ``--text-encoder`` also stores the captions' HART
context embeddings, ``--tokenizer`` the tokenizer's outputs for the images resized and
center-cropped to ``patch_nums[-1] * downsample`` pixels (``codes``: every scale's indices
concatenated, ``last_layer_gt``), the cached paths of training (``data.codes=True``).
Read it back with
``tfds.data_source(NAME, data_dir=OUT_DIR)``.

``build_records`` (examples -> optional cached context / codes -> ``write_records``) is the
part shared with the built-in dataset's CLI, ``python -m hart_jax.data.shapes``.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np

from hart_jax.data.records import DEFAULT_VERSION, scan_image_dir, write_records
from hart_jax.errors import OneLineArgumentParser


def _batches(rows: Iterable[Mapping[str, Any]], batch_size: int) -> Iterator[list[Mapping[str, Any]]]:
    it = iter(rows)
    while chunk := list(itertools.islice(it, batch_size)):
        yield chunk


def _with_context(rows: Iterable[Mapping[str, Any]], encoder: Any, batch_size: int) -> Iterator[dict[str, Any]]:
    for chunk in _batches(rows, batch_size):
        enc = encoder([e["caption"] for e in chunk])
        ctx, mask, pos = (np.asarray(a) for a in (enc.context, enc.context_mask, enc.context_position_ids))
        for j, e in enumerate(chunk):
            yield dict(e, context=ctx[j], context_mask=mask[j], context_position_ids=pos[j])


def _decode(image: Any) -> np.ndarray:
    import io

    from PIL import Image

    from hart_jax.data.records import encode_image

    if isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[-1] == 3 and image.dtype == np.uint8:
        return image
    return np.asarray(Image.open(io.BytesIO(encode_image(image))).convert("RGB"))


def _with_codes(rows: Iterable[Mapping[str, Any]], tokenizer: Any, patch_nums: tuple[int, ...],
                batch_size: int) -> Iterator[dict[str, Any]]:
    from hart_jax.data.pipeline import resize_crop

    side = patch_nums[-1] * tokenizer.config.downsample
    for chunk in _batches(rows, batch_size):
        imgs = np.stack([resize_crop(_decode(e["image"]), side) for e in chunk]).astype(np.float32) / 127.5 - 1.0
        tok = tokenizer.encode(imgs, patch_nums)
        codes = np.concatenate([np.asarray(i) for i in tok.indices], axis=1).astype(np.int32)
        gt = np.asarray(tok.last_layer_gt, np.float32)
        for j, e in enumerate(chunk):
            yield dict(e, codes=codes[j], last_layer_gt=gt[j])


def parse_patch_nums(text: str) -> tuple[int, ...] | None:
    """``"1,2,3"`` -> ``(1, 2, 3)``; ``""`` -> ``None`` (the tokenizer's own scales)."""
    if not text.strip():
        return None
    try:
        return tuple(int(p) for p in text.split(","))
    except ValueError:
        raise ValueError(f"--patch-nums must be comma-separated integers, got {text!r}") from None


def build_records(
    examples: Iterable[Mapping[str, Any]],
    out_dir: str | os.PathLike,
    *,
    name: str,
    kind: str = "t2i",
    split: str = "train",
    text_encoder: str | os.PathLike | None = None,
    tokenizer: str | os.PathLike | None = None,
    patch_nums: Sequence[int] | None = None,
    batch_size: int = 8,
    context_dtype: str = "float16",
    num_classes: int | None = None,
    class_names: Sequence[str] | None = None,
) -> Path:
    """Examples -> (optional cached context embeddings from the converted Qwen2 at
    ``text_encoder``, optional codes from the converted tokenizer at ``tokenizer``) ->
    ``write_records``; returns the dataset version directory ``out_dir/name/1.0.0``.

    ``examples`` may be any iterable (consumed once, lazily). ``class_names`` (c2i) sets
    ``num_classes`` and is written to ``out_dir/name/classes.txt``. Raises ``ValueError``
    (bad arguments, no examples) or ``FileExistsError`` before writing anything."""
    if kind not in ("t2i", "c2i"):
        raise ValueError(f"kind must be 't2i' or 'c2i', got {kind!r}")
    if text_encoder and kind != "t2i":
        raise ValueError("--text-encoder only applies to --kind t2i")
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    final = Path(out_dir) / name / DEFAULT_VERSION
    if final.exists():
        raise FileExistsError(f"{final} already exists; remove it or choose another name")
    if class_names is not None:
        num_classes = len(class_names)
    it = iter(examples)
    first = next(it, None)
    if first is None:
        raise ValueError("no examples to write")
    rows: Iterable[Mapping[str, Any]] = itertools.chain([first], it)
    kw: dict[str, Any] = dict(name=name, kind=kind, split=split)
    if text_encoder:
        from hart_jax.prompts import PromptEncoder

        enc = PromptEncoder.from_converted(str(text_encoder))
        probe = enc([first["caption"]])
        kw.update(context_shape=tuple(probe.context.shape[1:]), context_dtype=context_dtype)
        rows = _with_context(rows, enc, batch_size)
    if tokenizer:
        from hart_jax.tokenizer import HybridTokenizer

        tok = HybridTokenizer.from_converted(str(tokenizer))
        pn = tuple(int(p) for p in patch_nums) if patch_nums else tuple(tok.config.v_patch_nums)
        kw["codes_shape"] = (sum(p * p for p in pn), pn[-1] ** 2, tok.config.z_channels)
        rows = _with_codes(rows, tok, pn, batch_size)
    if kind == "c2i":
        kw["num_classes"] = num_classes
    out = write_records(out_dir, rows, **kw)
    if class_names:
        (out.parent / "classes.txt").write_text("\n".join(class_names) + "\n")
    return out


EXAMPLE = """example (photos/ holds cat.jpg + cat.txt, ...; the tokenizer was converted with
python -m hart_jax.convert tokenizer):

    python -m hart_jax.data.make_records photos/ data/ --name mine --tokenizer converted/tokenizer
"""


def build_parser() -> argparse.ArgumentParser:
    """The CLI's argument parser (argument errors: one ``error: ...`` line, exit 2)."""
    ap = OneLineArgumentParser(prog="python -m hart_jax.data.make_records", description=__doc__, epilog=EXAMPLE,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("images_dir", metavar="IMAGES_DIR",
                    help="images (t2i: each with a <stem>.txt caption; c2i: IMAGES_DIR/<class>/<image>)")
    ap.add_argument("out_dir", metavar="OUT_DIR", help="data directory; the dataset goes to OUT_DIR/NAME/1.0.0")
    ap.add_argument("--name", default="hart_images", help="dataset name (default: hart_images)")
    ap.add_argument("--kind", choices=("t2i", "c2i"), default="t2i",
                    help="t2i (image + caption) or c2i (image + class label) (default: t2i)")
    add_cache_arguments(ap)
    return ap


def add_cache_arguments(ap: argparse.ArgumentParser) -> None:
    """The arguments every record-writing CLI shares: split, cached context, cached codes."""
    ap.add_argument("--split", default="train", help="split name (default: train)")
    ap.add_argument("--text-encoder", metavar="DIR", default=None,
                    help="converted Qwen2 directory (python -m hart_jax.convert qwen2): also cache the "
                    "captions' context embeddings (t2i only)")
    ap.add_argument("--tokenizer", metavar="DIR", default=None,
                    help="converted tokenizer directory (python -m hart_jax.convert tokenizer): also cache "
                    "its codes of every image")
    ap.add_argument("--patch-nums", metavar="LIST", default="",
                    help="comma-separated scales for --tokenizer, e.g. 1,2,3,4,6 (default: the tokenizer's)")
    ap.add_argument("--batch-size", metavar="N", type=int, default=8,
                    help="batch size of the text encoder / tokenizer passes (default: 8)")
    ap.add_argument("--context-dtype", default="float16", choices=("float16", "float32", "bfloat16"),
                    help="dtype of the cached context embeddings (default: float16)")


def main(argv: list[str] | None = None) -> int:
    """The CLI (see the module docstring); returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        examples, classes = scan_image_dir(args.images_dir, args.kind)
        out = build_records(
            examples, args.out_dir, name=args.name, kind=args.kind, split=args.split,
            text_encoder=args.text_encoder, tokenizer=args.tokenizer,
            patch_nums=parse_patch_nums(args.patch_nums), batch_size=args.batch_size,
            context_dtype=args.context_dtype, class_names=classes if args.kind == "c2i" else None,
        )
    except (ValueError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {len(examples)} examples to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
