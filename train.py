"""Train HART's transformer and diffusion head, or its hybrid tokenizer (``task="tokenizer"``).

    python train.py --config configs/train.py:tiny_t2i --workdir /tmp/run [--config.train.num_steps=100 ...]
    python train.py --config configs/train.py:tokenizer_tiny --workdir /tmp/tok --config.data.name=...

Starting again with the same ``--workdir`` resumes from its latest checkpoint.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "training config file[:preset]", lock_config=True)
flags.DEFINE_string("workdir", None, "run directory (checkpoints, TensorBoard, config)")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    from hart_jax.errors import HartError

    config = flags.FLAGS.config
    task = str(config.get("task", "transformer"))
    if task == "tokenizer":
        from hart_jax.train.tokenizer_loop import train_tokenizer as train
    elif task == "transformer":
        from hart_jax.train.loop import train
    else:
        raise SystemExit(f"train.py: unknown task {task!r} (expected 'transformer' or 'tokenizer')")
    try:
        last = train(config, flags.FLAGS.workdir)
    except (HartError, ValueError) as e:  # one line, status 2
        print(f"train.py: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    if last:
        print(f"done at step {last['step']}: loss {last['loss']:.4f}", flush=True)


if __name__ == "__main__":
    app.run(main)
