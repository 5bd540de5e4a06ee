"""Pallas kernels for HART's attention, each beside a pure-jnp reference.

- ``level_attention``: fused flash attention (forward + backward) under the
  level mask ``level(k) <= level(q)`` (training, teacher forcing).
- ``cache_attention``: one scale's queries against a KV cache with a valid length
  (sampling; forward only).
- ``reference``: dense fp32 references of both (also the ``xla`` implementation).
- ``compat``: the Pallas names that differ between JAX versions.

The modules are named after their main function, so import from the module
(``from hart_jax.kernels.level_attention import level_attention``).
``hart_jax.attention`` chooses between these and cuDNN; model code calls that.
"""
