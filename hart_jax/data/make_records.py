"""Directory of images (+ captions) -> TFDS array_record dataset.

    python -m hart_jax.data.make_records IMAGES_DIR OUT_DIR [--name NAME] [--kind t2i|c2i]
        [--text-encoder CONVERTED_QWEN_DIR [--batch-size 8] [--context-dtype float16]]

``t2i``: every image with a ``<stem>.txt`` caption beside it. ``c2i``: ImageNet layout
(``IMAGES_DIR/<class>/<image>``; labels are the sorted class names' positions, written
to ``OUT_DIR/NAME/classes.txt``). ``--text-encoder`` also stores the captions' HART
context embeddings (the cached path of training). Read it back with
``tfds.data_source(NAME, data_dir=OUT_DIR)``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("images_dir")
    ap.add_argument("out_dir")
    ap.add_argument("--name", default="hart_images")
    ap.add_argument("--kind", choices=("t2i", "c2i"), default="t2i")
    ap.add_argument("--split", default="train")
    ap.add_argument("--text-encoder", default=None, help="converted Qwen2 directory: also cache context embeddings")
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
