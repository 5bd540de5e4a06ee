"""User-facing hybrid tokenizer: images <-> multi-scale indices + continuous residual.

Layout and ranges (all NHWC, float32 unless stated):
  * images ``[B, Hi, Wi, 3]`` in [-1, 1] (map uint8 with ``x / 127.5 - 1``);
    decoded images are clamped to [-1, 1];
  * indices: a list with one ``[B, pn*pn]`` int32 map per scale, row-major;
  * residual / ``last_layer_gt``: ``[B, h*w, C]`` with ``h = w = patch_nums[-1]``.

Every method is jitted once per input shape and ``patch_nums``.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from hart_jax.models.autoencoder import HARTAutoEncoder, TokenizerConfig

Params = Any


@dataclasses.dataclass(frozen=True)
class HybridTokens:
    """Result of ``HybridTokenizer.encode``.

    ``indices``: per-scale index maps ``[B, pn^2]``.
    ``last_layer_gt``: residual *before* the last discrete scale ``[B, h*w, C]``
    (the transformer's continuous training target).
    ``residual``: ``f - f_hat_discrete`` ``[B, h*w, C]`` (what the diffusion head adds).
    """

    indices: list[jax.Array]
    last_layer_gt: jax.Array
    residual: jax.Array


# --------------------------------------------------------------- pure, jitted
@functools.partial(jax.jit, static_argnums=(0,))
def _encode_latent(model: HARTAutoEncoder, variables: Params, img: jax.Array) -> jax.Array:
    return model.apply(variables, img, method=HARTAutoEncoder.encode)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _tokenize(model, variables, f, patch_nums):
    def fn(m, f):
        idx, frest = m.quantize.f_to_idx_and_frest(f, patch_nums)
        last = m.quantize.lookup(idx[-1], patch_nums[-1]).reshape(frest.shape)
        return idx, frest, frest - last

    return model.apply(variables, f, method=fn)


@functools.partial(jax.jit, static_argnums=(0, 3, 4))
def _fhat(model, variables, indices, patch_nums, phi_on_last):
    return model.apply(
        variables,
        indices,
        method=lambda m, i: m.quantize.idx_to_fhat(i, patch_nums, phi_on_last=phi_on_last),
    )


@functools.partial(jax.jit, static_argnums=(0, 3))
def _tf_inputs(model, variables, indices, patch_nums):
    return model.apply(
        variables, indices, method=lambda m, i: m.quantize.teacher_forcing_inputs(i, patch_nums)
    )


@functools.partial(jax.jit, static_argnums=(0,))
def _decode(model, variables, f_hat):
    return model.apply(variables, f_hat, method=HARTAutoEncoder.decode)


class HybridTokenizer:
    """A converted tokenizer (config + params) with validated, jitted operations."""

    def __init__(
        self,
        config: TokenizerConfig,
        variables: Params,
        *,
        dtype: Any = jnp.float32,
        precision: Any = None,
    ) -> None:
        self.config = config
        self.variables = variables if "params" in variables else {"params": variables}
        self.model = HARTAutoEncoder(config, dtype=dtype, precision=precision)

    # ------------------------------------------------------------ loading
    @classmethod
    def from_converted(cls, ckpt_dir: str | os.PathLike, **kw: Any) -> "HybridTokenizer":
        """Load a directory written by ``python -m hart_jax.convert tokenizer``."""
        from hart_jax.checkpoint import load_converted

        cfg_dict, variables = load_converted(ckpt_dir, kind="tokenizer")
        return cls(TokenizerConfig.from_hf_dict(cfg_dict, source=f"{ckpt_dir}/config.json"), variables, **kw)

    @classmethod
    def from_release(cls, src_dir: str | os.PathLike, **kw: Any) -> "HybridTokenizer":
        """Convert a release ``tokenizer/`` directory in memory and wrap it."""
        from hart_jax.convert.tokenizer import convert_tokenizer

        cfg, variables = convert_tokenizer(src_dir)
        return cls(cfg, variables, **kw)

    # --------------------------------------------------------- validation
    def _patch_nums(self, patch_nums: Sequence[int] | None) -> tuple[int, ...]:
        pn = tuple(int(p) for p in (patch_nums or self.config.v_patch_nums))
        if not pn or any(p <= 0 for p in pn) or list(pn) != sorted(pn):
            raise ValueError(f"patch_nums must be increasing positive ints, got {pn}")
        return pn

    def check_images(self, images: Any, patch_nums: Sequence[int] | None = None) -> jax.Array:
        """Validate ``[B, H, W, 3]`` float images; ``patch_nums`` also checks the grid size."""
        shape = tuple(getattr(images, "shape", ()))
        dtype = getattr(images, "dtype", None)
        c = self.config.in_channels
        ds = self.config.downsample
        if len(shape) != 4:
            raise ValueError(f"images must be a 4-D array [B, H, W, {c}] (NHWC), got shape {shape}")
        if shape[-1] != c:
            hint = " (looks like NCHW; transpose to NHWC)" if shape[1] == c else ""
            raise ValueError(f"images must have {c} channels in the last axis, got shape {shape}{hint}")
        if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(
                f"images must be floating point in [-1, 1], got dtype {dtype} "
                "(convert uint8 with x / 127.5 - 1)"
            )
        h, w = shape[1], shape[2]
        if patch_nums is not None:
            side = patch_nums[-1] * ds
            if (h, w) != (side, side):
                raise ValueError(
                    f"images of {h}x{w} do not fit the patch grid: patch_nums[-1]={patch_nums[-1]} "
                    f"x downsample {ds} needs {side}x{side}"
                )
        elif h % ds or w % ds:
            raise ValueError(f"image size {h}x{w} is not a multiple of the downsampling factor {ds}")
        return jnp.asarray(images, jnp.float32)

    def check_indices(self, indices: Sequence[Any], patch_nums: Sequence[int]) -> list[jax.Array]:
        """Validate a list of per-scale index maps against ``patch_nums``."""
        if len(indices) != len(patch_nums):
            raise ValueError(f"expected {len(patch_nums)} index maps (one per scale {tuple(patch_nums)}), got {len(indices)}")
        out = []
        batch = None
        for si, (idx, pn) in enumerate(zip(indices, patch_nums)):
            shape = tuple(getattr(idx, "shape", ()))
            b = shape[0] if shape else None
            batch = b if batch is None else batch
            if len(shape) != 2 or shape[1] != pn * pn or b != batch:
                raise ValueError(f"index map of scale {si} must have shape [{batch}, {pn * pn}], got {shape}")
            if not jnp.issubdtype(idx.dtype, jnp.integer):
                raise ValueError(f"index map of scale {si} must be integer, got dtype {idx.dtype}")
            if not isinstance(idx, jax.core.Tracer):
                a = np.asarray(idx)
                if a.size and (a.min() < 0 or a.max() >= self.config.vocab_size):
                    raise ValueError(
                        f"index map of scale {si} has values outside [0, {self.config.vocab_size})"
                    )
            out.append(jnp.asarray(idx, jnp.int32))
        return out

    def _check_residual(self, residual: Any, batch: int, side: int) -> jax.Array:
        want = (batch, side * side, self.config.z_channels)
        if tuple(residual.shape) != want:
            raise ValueError(f"residual must have shape {list(want)} ([B, h*w, C]), got {list(residual.shape)}")
        return jnp.asarray(residual, jnp.float32)

    # ---------------------------------------------------------- operations
    def encode_latent(self, images: Any) -> jax.Array:
        """Images -> continuous latent f ``[B, H/16, W/16, C]`` (after ``quant_conv``)."""
        return _encode_latent(self.model, self.variables, self.check_images(images))

    def encode(self, images: Any, patch_nums: Sequence[int] | None = None) -> HybridTokens:
        """Images -> per-scale indices + continuous residual (hybrid tokenization)."""
        pn = self._patch_nums(patch_nums)
        f = _encode_latent(self.model, self.variables, self.check_images(images, pn))
        idx, frest, res = _tokenize(self.model, self.variables, f, pn)
        return HybridTokens(list(idx), frest, res)

    def fhat_per_scale(
        self, indices: Sequence[Any], patch_nums: Sequence[int] | None = None, *, phi_on_last: bool = False
    ) -> list[jax.Array]:
        """Cumulative f_hat ``[B, h, w, C]`` after each scale (HART convention by default)."""
        pn = self._patch_nums(patch_nums)
        return list(_fhat(self.model, self.variables, self.check_indices(indices, pn), pn, phi_on_last))

    def teacher_forcing_inputs(self, indices: Sequence[Any], patch_nums: Sequence[int] | None = None) -> jax.Array:
        """Transformer inputs of scales 1..S-1, ``[B, sum(pn^2) - pn0^2, C]``."""
        pn = self._patch_nums(patch_nums)
        return _tf_inputs(self.model, self.variables, self.check_indices(indices, pn), pn)

    def decode_latent(self, f_hat: Any) -> jax.Array:
        """Latent ``[B, h, w, C]`` -> image in [-1, 1] (``fhat_to_img``)."""
        shape = tuple(f_hat.shape)
        if len(shape) != 4 or shape[-1] != self.config.z_channels:
            raise ValueError(f"latent must have shape [B, h, w, {self.config.z_channels}], got {shape}")
        return _decode(self.model, self.variables, jnp.asarray(f_hat, jnp.float32))

    def decode(
        self,
        indices: Sequence[Any],
        residual: Any | None = None,
        patch_nums: Sequence[int] | None = None,
        *,
        convention: str = "hart",
    ) -> jax.Array:
        """Indices (+ optional residual) -> image in [-1, 1].

        ``residual`` given: hybrid reconstruction ``f_hat_discrete + residual``.
        ``residual=None``: discrete-only; ``convention="hart"`` adds the last scale
        without φ (HART generation), ``"var"`` applies φ at the last scale too (VAR's
        ``idxBl_to_img``).
        """
        if convention not in ("hart", "var"):
            raise ValueError(f"convention must be 'hart' or 'var', got {convention!r}")
        if residual is not None and convention != "hart":
            raise ValueError("a residual is only defined for the 'hart' convention")
        pn = self._patch_nums(patch_nums)
        f_hat = self.fhat_per_scale(indices, pn, phi_on_last=convention == "var")[-1]
        if residual is not None:
            b, h, w, c = f_hat.shape
            f_hat = f_hat + self._check_residual(residual, b, h).reshape(b, h, w, c)
        return _decode(self.model, self.variables, f_hat)
