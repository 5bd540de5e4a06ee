"""Train HART's transformer and diffusion head.

    python train.py --config configs/train.py:tiny_t2i --workdir /tmp/run [--config.train.num_steps=100 ...]

Starting again with the same ``--workdir`` resumes from its latest checkpoint.
"""

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
    from hart_jax.train.loop import train

    try:
        last = train(flags.FLAGS.config, flags.FLAGS.workdir)
    except (HartError, ValueError) as e:
        raise SystemExit(f"train.py: {type(e).__name__}: {e}") from None
    if last:
        print(f"done at step {last['step']}: loss {last['loss']:.4f}", flush=True)


if __name__ == "__main__":
    app.run(main)
