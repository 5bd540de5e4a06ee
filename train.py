"""Train HART's transformer and diffusion head, or its hybrid tokenizer (``task="tokenizer"``).

    python train.py --config configs/train.py:tiny_t2i --workdir /tmp/run [--config.train.num_steps=100 ...]
    python train.py --config configs/train.py:tokenizer_tiny --workdir /tmp/tok --config.data.name=...

Starting again with the same ``--workdir`` resumes from its newest good checkpoint (a damaged
newer one is moved aside). SIGTERM saves a checkpoint at the next step boundary and exits 0.
Mistakes (unknown preset, misspelled override, missing data) are one ``train.py: error:`` line,
status 2. The command line is ``hart_jax.train.cli``.
"""

from hart_jax.train.cli import main

if __name__ == "__main__":
    main()
