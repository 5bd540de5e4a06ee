"""Text-to-image pipeline: prompts -> images with one compiled program per batch shape.

A converted pipeline directory (``python -m hart_jax.convert release ...``) holds::

    <dir>/tokenizer/      converted hybrid tokenizer
    <dir>/transformer/    converted HART transformer (EMA weights)
    <dir>/text_encoder/   converted Qwen2 + its tokenizer files + the prompt prefix
    <dir>/hart_jax.json   marker (kind "pipeline"), written last

Text encoding, every autoregressive scale with its KV cache, the diffusion head and
the decoder run inside ONE jitted program per (batch size, sampling settings that
change the program: top-k, top-p, more_smooth). The guidance scale and the seeds are
runtime inputs; a short batch is padded to the compiled size. Image i of a call uses
seed ``seed + i`` (or ``seeds[i]``), so a batch gives the same images as single calls.

Dimensions (docs/design.md): B batch (images per program call); L tokens (prefix + prompt);
T context tokens.

Compiled programs are also kept on disk by JAX's persistent compilation cache, so a new
process running the same shapes loads them instead of compiling (``compile_cache``;
policy and default directory in ``hart_jax/compile_cache.py``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from hart_jax.attention import resolve_impl
from hart_jax.checkpoint import MARKER, load_converted, read_marker
from hart_jax.compile_cache import CacheSetting, enable_compile_cache
from hart_jax.errors import CheckpointError
from hart_jax.loading import PIPELINE_KIND, PIPELINE_PARTS, load_transformer, write_pipeline_marker
from hart_jax.models.autoencoder import HARTAutoEncoder, TokenizerConfig
from hart_jax.models.transformer import HARTTransformer, T2IConfig
from hart_jax.sampling import InjectedNoise, SamplingConfig, sample_images
from hart_jax.train.sharding import DEFAULT_RULES, batch_divisor, batch_sharding, check_mesh, tree_shardings


def default_dtype() -> Any:
    """bf16 compute on accelerators, fp32 on CPU."""
    return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16


def to_uint8(images_01: np.ndarray, truncate: bool = False) -> np.ndarray:
    """[0, 1] floats -> uint8. Rounds by default; ``truncate`` reproduces the release's
    ``mul(255)`` then integer cast."""
    x = np.clip(np.asarray(images_01, np.float32), 0.0, 1.0) * 255.0
    return (np.floor(x) if truncate else np.round(x)).astype(np.uint8)


def seed_keys(seeds: Sequence[int]) -> np.ndarray:
    """One ``jax.random.PRNGKey(seed)`` per image, stacked ``[N, 2]`` (host memory)."""
    return np.stack([np.asarray(jax.random.PRNGKey(int(s))) for s in seeds])


def check_pipeline_dir(ckpt_dir: str | os.PathLike) -> Path:
    """Validate a converted pipeline directory; errors name the missing part."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        raise CheckpointError(f"{d}: checkpoint directory not found")
    for part in PIPELINE_PARTS:
        if not (d / part).is_dir():
            raise CheckpointError(f"{d}: missing part {part}/ (convert with python -m hart_jax.convert release)")
        read_marker(d / part)
    if (d / MARKER).is_file():
        read_marker(d, PIPELINE_KIND)
    return d


class HARTPipeline:
    """Loaded tokenizer + transformer + text encoder, and the compiled programs.

    ``compile_cache``: JAX's persistent compilation cache. ``None`` follows the policy of
    ``hart_jax.compile_cache`` (``$HART_JAX_COMPILE_CACHE``, else
    ``$XDG_CACHE_HOME/hart_jax/jax_cache`` = ``~/.cache/hart_jax/jax_cache``; an earlier
    choice in this process is kept), ``False`` none, a path that directory (an unusable
    one is a ``HartError``). The cache is process-wide: a later pipeline that asks for
    another directory switches it for every program compiled from then on, and a cache
    directory configured through JAX itself always wins. ``compile_cache_dir`` is the
    directory in use (None: off).

    Sharding uses training's vocabulary (``hart_jax.train.sharding``): ``mesh`` is a
    ``(data, fsdp, tensor)`` mesh (``make_mesh``); each batch is split over the mesh axes of
    the ``batch`` rule (padded up to a multiple of their size) and the programs run under
    ``rules`` (default ``DEFAULT_RULES``, as training), so the attention kernels split rows
    and heads the same way. ``shard_params`` places every weight (transformer, tokenizer,
    text encoder) by ``PARAM_LOGICAL_AXES`` under ``rules``, else weights are replicated;
    it needs an axis that the rules split weights over (``fsdp`` / ``tensor``) of size > 1,
    and is refused on a mesh splitting ``data``, ``fsdp`` and ``tensor`` all at once: on a
    2 x 2 x 2 mesh the compiled sampler gave wrong rows (the rows of the (data 0, fsdp 1) and
    (data 1, fsdp 0) devices) while the two-axis meshes tried (2x4x1, 4x2x1, 2x1x4, 1x4x2,
    1x2x4, 2x2x1) matched one device.
    """

    def __init__(
        self,
        tok_cfg: TokenizerConfig,
        tok_vars: Any,
        t2i_cfg: T2IConfig,
        t2i_vars: Any,
        text_encoder: Any | None = None,
        *,
        dtype: Any = None,
        mesh: jax.sharding.Mesh | None = None,
        shard_params: bool = False,
        rules: Sequence[tuple[str, Any]] = DEFAULT_RULES,
        compile_cache: CacheSetting = None,
    ) -> None:
        self.rules = [tuple(r) for r in rules]
        if mesh is not None:
            check_mesh(mesh, self.rules, shard_params)
            split = [a for a in mesh.axis_names if mesh.shape[a] > 1]
            if shard_params and len(split) >= 3:
                raise ValueError(
                    f"shard_params on a mesh that splits all of {', '.join(split)} is refused: XLA samples wrong "
                    "tokens there (seen with JAX 0.10.2 and 0.12 on CPU); keep one of these axes at size 1"
                )
        elif shard_params:
            raise ValueError("shard_params=True needs a mesh")
        self.compile_cache_dir = enable_compile_cache(compile_cache)  # before anything compiles
        self.dtype = dtype or default_dtype()
        self.shard_params = shard_params
        self.tok_cfg, self.t2i_cfg = tok_cfg, t2i_cfg
        self.tok = HARTAutoEncoder(tok_cfg)  # the tokenizer runs in fp32 (f_hat, decoder)
        self.t2i = HARTTransformer(t2i_cfg, dtype=self.dtype)
        self.text_encoder = text_encoder
        self.mesh = mesh
        self.tok_vars = self._place(tok_vars if "params" in tok_vars else {"params": tok_vars})
        self.t2i_vars = self._place(t2i_vars if "params" in t2i_vars else {"params": t2i_vars})
        self.text_params = self._place(text_encoder.params) if text_encoder is not None else None
        if text_encoder is not None:
            if text_encoder.max_length != t2i_cfg.context_token:
                raise ValueError(
                    f"text encoder pads to {text_encoder.max_length} tokens but the transformer "
                    f"expects context_token={t2i_cfg.context_token}"
                )
            if text_encoder.config.hidden_size != t2i_cfg.context_dim:
                raise ValueError(
                    f"text encoder width {text_encoder.config.hidden_size} != transformer "
                    f"context_dim {t2i_cfg.context_dim}"
                )
        self._programs: dict[tuple, Callable] = {}
        self.num_compiles = 0  # incremented once per trace (= per compilation)

    # ---------------------------------------------------------------- loading
    @classmethod
    def from_converted(
        cls, ckpt_dir: str | os.PathLike, attention_impl: str | None = None, **kw: Any
    ) -> "HARTPipeline":
        """Load a directory written by ``python -m hart_jax.convert release``.

        ``attention_impl`` (``auto``/``xla``/``cudnn``/``pallas``) overrides the
        transformer's attention implementation (default: the config's, ``auto``).
        Keywords go to ``HARTPipeline(...)``; ``compile_cache`` takes effect before loading.
        """
        from hart_jax.prompts import PromptEncoder

        enable_compile_cache(kw.get("compile_cache"))  # before loading compiles anything
        d = check_pipeline_dir(ckpt_dir)
        tok_cfg_d, tok_vars = load_converted(d / "tokenizer", kind="tokenizer")
        tok_cfg = TokenizerConfig.from_hf_dict(tok_cfg_d, source=str(d / "tokenizer" / "config.json"))
        t2i_cfg_d, t2i_vars = load_transformer(d / "transformer")
        t2i_cfg = T2IConfig.from_hf_dict(
            t2i_cfg_d, vocab_size=t2i_cfg_d["vocab_size"], z_channels=t2i_cfg_d["z_channels"],
            source=str(d / "transformer" / "config.json"),
        )
        if attention_impl is not None:
            resolve_impl(attention_impl)  # a ValueError naming the choices, before any weights are placed
            t2i_cfg = dataclasses.replace(t2i_cfg, attention_impl=attention_impl)
        text = PromptEncoder.from_converted(d / "text_encoder", dtype=kw.get("dtype") or default_dtype())
        return cls(tok_cfg, tok_vars, t2i_cfg, t2i_vars, text, **kw)

    def _place(self, tree: Any) -> Any:
        if self.mesh is None:  # abstract leaves (ShapeDtypeStruct) pass through for AOT lowering
            keep = lambda x: x if isinstance(x, jax.ShapeDtypeStruct) else jnp.asarray(x)
            return jax.tree_util.tree_map(keep, tree)
        if self.shard_params:
            return jax.device_put(tree, tree_shardings(tree, self.mesh, self.rules))
        rep = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        return jax.device_put(tree, rep)

    # ------------------------------------------------------------- properties
    @property
    def resolution(self) -> int:
        """Side of the generated images in pixels (``pn_last * downsample``)."""
        return self.t2i_cfg.patch_nums[-1] * self.tok_cfg.downsample

    # --------------------------------------------------------------- programs
    def program(self, batch: int, scfg: SamplingConfig, *, from_context: bool = False, trace: bool = False) -> Callable:
        """The jitted program for ``batch`` images (cached per shape and settings)."""
        key = (batch, scfg, from_context, trace)
        if key in self._programs:
            return self._programs[key]
        t2i, tok, text = self.t2i, self.tok, self.text_encoder
        n_ctx = self.t2i_cfg.context_token

        def sample(t2i_vars, tok_vars, context, mask, pos, keys, guidance, injected):
            self.num_compiles += 1
            return sample_images(t2i, t2i_vars, tok, tok_vars, context, mask, pos, keys, guidance, scfg,
                                 injected, trace)

        if from_context:
            fn = sample
        else:
            if text is None:
                raise ValueError("this pipeline has no text encoder; use generate_from_context")

            def fn(t2i_vars, tok_vars, text_params, ids, attn, mask, pos, keys, guidance):
                with jax.named_scope("text_encoder"):
                    hidden = text.model.apply({"params": text_params}, ids, attn)
                context = hidden[:, -n_ctx:].astype(jnp.float32)
                return sample(t2i_vars, tok_vars, context, mask, pos, keys, guidance, None)

        jitted = jax.jit(fn)
        self._programs[key] = jitted if self.mesh is None else _InMesh(jitted, self.mesh, self.rules)
        return self._programs[key]

    # ------------------------------------------------------------- generation
    def generate_from_context(
        self,
        context: Any,
        context_mask: Any,
        context_position_ids: Any,
        *,
        seeds: Sequence[int] | None = None,
        keys: Any = None,
        guidance_scale: float = 4.5,
        sampling: SamplingConfig = SamplingConfig(),
        injected: InjectedNoise | None = None,
        return_trace: bool = False,
    ) -> Any:
        """Images ``[B, H, W, 3]`` in [0, 1] from precomputed text features."""
        b = int(np.shape(context)[0])
        if keys is None:
            seeds = list(seeds) if seeds is not None else list(range(b))
            keys = seed_keys(seeds)
        fn = self.program(b, sampling, from_context=True, trace=return_trace)
        return fn(self.t2i_vars, self.tok_vars, jnp.asarray(context, jnp.float32), jnp.asarray(context_mask),
                  jnp.asarray(context_position_ids), keys, jnp.float32(guidance_scale), injected)

    def __call__(
        self,
        prompts: Sequence[str] | str,
        *,
        guidance_scale: float = 4.5,
        seed: int | Sequence[int] = 1,
        top_k: int | None = None,
        top_p: float = 0.0,
        more_smooth: bool = True,
        num_images_per_prompt: int = 1,
        batch_size: int | None = None,
        progress: bool = False,
        truncate_uint8: bool = False,
        output: str = "uint8",
        callback: Callable[[int, np.ndarray], None] | None = None,
    ) -> np.ndarray:
        """Generate images for ``prompts``; returns ``[N, H, W, 3]`` with
        ``N = len(prompts) * num_images_per_prompt`` (prompt-major order), uint8
        (``output="uint8"``) or float32 in [0, 1] (``output="float"``).

        ``seed``: image i uses ``seed + i``, or pass one seed per image. ``top_k=None``
        is the release's stage rule (600 / 300). ``batch_size`` images run per compiled
        program (default: all, at most 8); the last batch is padded, not recompiled.
        ``callback(start, images_uint8)`` is called after each batch.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if output not in ("uint8", "float"):
            raise ValueError(f"output must be 'uint8' or 'float', got {output!r}")
        if not prompts:
            raise ValueError("no prompts given")
        if num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be >= 1, got {num_images_per_prompt}")
        all_prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        n = len(all_prompts)
        if isinstance(seed, int):
            seeds = [seed + i for i in range(n)]
        else:
            seeds = [int(s) for s in seed]
            if len(seeds) != n:
                raise ValueError(f"got {len(seeds)} seeds for {n} images")
        bs = batch_size or min(n, 8)
        if bs < 1:
            raise ValueError(f"batch_size must be >= 1, got {bs}")
        if self.mesh is not None:
            size = batch_divisor(self.mesh, self.rules)
            bs = int(math.ceil(bs / size) * size)
        scfg = SamplingConfig(top_k=top_k, top_p=float(top_p), more_smooth=bool(more_smooth))
        fn = self.program(bs, scfg)
        out = []
        starts = range(0, n, bs)
        if progress:
            from tqdm import tqdm

            starts = tqdm(starts, total=len(starts), desc="batches", unit="batch")
        for start in starts:
            chunk = all_prompts[start : start + bs]
            chunk_seeds = seeds[start : start + bs]
            pad = bs - len(chunk)
            chunk = chunk + [chunk[-1]] * pad
            chunk_seeds = chunk_seeds + [chunk_seeds[-1]] * pad
            tokens = self.text_encoder.tokenize(chunk)
            ids, attn = tokens.encoder_inputs()
            keys = seed_keys(chunk_seeds)
            args = [ids, attn, tokens.context_mask, tokens.context_position_ids, keys]
            if self.mesh is not None:
                args = [jax.device_put(a, batch_sharding(self.mesh, self.rules)) for a in args]
            imgs = fn(self.t2i_vars, self.tok_vars, self.text_params, *args, jnp.float32(guidance_scale))
            imgs = np.asarray(imgs, np.float32)[: bs - pad]
            if output == "uint8":
                imgs = to_uint8(imgs, truncate_uint8)
            if callback is not None:
                callback(start, imgs)
            out.append(imgs)
        return np.concatenate(out, 0)


class _InMesh:
    """A jitted program traced, lowered and run with ``mesh`` as the context mesh and the
    sharding ``rules`` in context, so the attention kernels split rows and heads as in
    training (``hart_jax.attention.kernel_mesh_axes``) and the text encoder's activation
    constraints apply."""

    def __init__(self, jitted: Any, mesh: jax.sharding.Mesh, rules: Sequence[tuple[str, Any]]) -> None:
        self.jitted, self.mesh, self.rules = jitted, mesh, list(rules)

    def __call__(self, *args: Any) -> Any:
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            return self.jitted(*args)

    def trace(self, *args: Any) -> Any:
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            return self.jitted.trace(*args)

    def lower(self, *args: Any) -> Any:
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            return self.jitted.lower(*args)


def assemble_pipeline(
    out_dir: str | os.PathLike,
    parts: dict[str, str | os.PathLike],
    *,
    sampling: dict[str, Any] | None = None,
    force: bool = False,
) -> Path:
    """Copy three converted directories (``parts``: tokenizer, transformer, text_encoder ->
    path) into one pipeline directory, written atomically, with ``sampling.json`` (the
    sampling defaults ``sample.py`` reads) when ``sampling`` is given."""
    import shutil

    from hart_jax.checkpoint import atomic_directory

    if sorted(parts) != sorted(PIPELINE_PARTS):
        raise ValueError(f"parts must name exactly {', '.join(PIPELINE_PARTS)}, got {', '.join(sorted(parts))}")
    for part, src in parts.items():
        read_marker(src, part)
    with atomic_directory(out_dir, force) as tmp:
        for part, src in parts.items():
            shutil.copytree(src, tmp / part)
        if sampling is not None:
            (tmp / "sampling.json").write_text(json.dumps(sampling, indent=2) + "\n")
        write_pipeline_marker(tmp, {part: str(Path(src).absolute()) for part, src in parts.items()})
    return Path(out_dir).absolute()

