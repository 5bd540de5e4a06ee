"""Generate images with HART from text prompts.

Examples:
    python sample.py                                   # the built-in shapes model, its demo prompts, one grid
    python sample.py --prompt "a red circle"           # the built-in model, one prompt
    python sample.py --ckpt converted/hart-0.7b-1024px --prompt "a red fox in the snow" --out-dir out/

Without ``--ckpt`` the built-in default model (``hart_jax.builtin``, trained by hart-jax on its
procedural shapes dataset) is used. A release checkpoint directory comes from
``python -m hart_jax.convert release hart-0.7b-1024px Qwen2-VL-1.5B-Instruct OUT --prefix-from constants.py``.
Writes one PNG per image (or one grid with --grid) and settings.json with every
prompt and setting used. Compiled programs are kept in JAX's persistent compilation cache
(default ``~/.cache/hart_jax/jax_cache``; ``--no-compile-cache`` for none), so a later run of
the same shapes skips compiling. Errors print one line and exit with status 2. The flags and
the work are in ``hart_jax/sample_cli.py``.
"""

from __future__ import annotations

import sys

from hart_jax.sample_cli import main

if __name__ == "__main__":
    sys.exit(main())
