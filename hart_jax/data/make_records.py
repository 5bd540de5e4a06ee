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
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Iterator

import numpy as np

from hart_jax.data.records import scan_image_dir, write_records


def _with_context(examples: list[dict[str, Any]], encoder: Any, batch_size: int) -> Iterator[dict[str, Any]]:
    for s in range(0, len(examples), batch_size):
        chunk = examples[s : s + batch_size]
        enc = encoder([e["caption"] for e in chunk])
        ctx, mask, pos = (np.asarray(a) for a in (enc.context, enc.context_mask, enc.context_position_ids))
        for j, e in enumerate(chunk):
            yield dict(e, context=ctx[j], context_mask=mask[j], context_position_ids=pos[j])


def _with_codes(rows: Any, tokenizer: Any, patch_nums: tuple[int, ...], batch_size: int) -> Iterator[dict[str, Any]]:
    from hart_jax.data.pipeline import resize_crop
    from hart_jax.data.records import encode_image

    side = patch_nums[-1] * tokenizer.config.downsample

    def flush(chunk):
        imgs = np.stack([resize_crop(_decode(e["image"]), side) for e in chunk]).astype(np.float32) / 127.5 - 1.0
        tok = tokenizer.encode(imgs, patch_nums)
        codes = np.concatenate([np.asarray(i) for i in tok.indices], axis=1).astype(np.int32)
        gt = np.asarray(tok.last_layer_gt, np.float32)
        for j, e in enumerate(chunk):
            yield dict(e, codes=codes[j], last_layer_gt=gt[j])

    def _decode(image):
        import io

        from PIL import Image

        return np.asarray(Image.open(io.BytesIO(encode_image(image))).convert("RGB"))

    chunk = []
    for e in rows:
        chunk.append(e)
        if len(chunk) == batch_size:
            yield from flush(chunk)
            chunk = []
    if chunk:
        yield from flush(chunk)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("images_dir")
    ap.add_argument("out_dir")
    ap.add_argument("--name", default="hart_images")
    ap.add_argument("--kind", choices=("t2i", "c2i"), default="t2i")
    ap.add_argument("--split", default="train")
    ap.add_argument("--text-encoder", default=None, help="converted Qwen2 directory: also cache context embeddings")
    ap.add_argument("--tokenizer", default=None, help="converted tokenizer directory: also cache its codes")
    ap.add_argument("--patch-nums", default="", help="scales for --tokenizer (default: the tokenizer's)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--context-dtype", default="float16", choices=("float16", "float32", "bfloat16"))
    args = ap.parse_args(argv)
    try:
        examples, classes = scan_image_dir(args.images_dir, args.kind)
        kw: dict[str, Any] = dict(name=args.name, kind=args.kind, split=args.split)
        rows: Any = examples
        if args.text_encoder:
            if args.kind != "t2i":
                raise ValueError("--text-encoder only applies to --kind t2i")
            from hart_jax.prompts import PromptEncoder

            enc = PromptEncoder.from_converted(args.text_encoder)
            first = enc([examples[0]["caption"]])
            kw.update(context_shape=tuple(first.context.shape[1:]), context_dtype=args.context_dtype)
            rows = _with_context(examples, enc, args.batch_size)
        if args.tokenizer:
            from hart_jax.tokenizer import HybridTokenizer

            tok = HybridTokenizer.from_converted(args.tokenizer)
            pn = tuple(int(p) for p in args.patch_nums.split(",")) if args.patch_nums else tuple(tok.config.v_patch_nums)
            kw["codes_shape"] = (sum(p * p for p in pn), pn[-1] ** 2, tok.config.z_channels)
            rows = _with_codes(rows, tok, pn, args.batch_size)
        if args.kind == "c2i":
            kw["num_classes"] = len(classes)
        out = write_records(args.out_dir, rows, **kw)
        if classes:
            (out.parent / "classes.txt").write_text("\n".join(classes) + "\n")
    except (ValueError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {len(examples)} examples to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
