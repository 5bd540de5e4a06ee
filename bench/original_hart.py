"""Time the ORIGINAL PyTorch HART release on the shapes and inputs of ``sample_bench.py``.

    HART_SRC=/path/to/hart python bench/original_hart.py --preset full --batch-sizes 1 8
    HART_SRC=/path/to/hart python bench/original_hart.py --preset tiny --device cpu   # dry run

``HART_SRC`` is a local copy of the original source (mit-han-lab/hart; never committed
here, never downloaded by this script). Its models are built from the same configs as
``sample_bench.py`` (``hart_jax.random_init.preset_configs``, through each config's
release-format dict) with random weights, and run as the release's ``latency_profile.py``
runs them: fp32 weights under fp16 autocast, ``inference_mode``, Qwen2 text encoding then
``autoregressive_infer_cfg`` (cfg 4.5, ``more_smooth``, the release's top-k rule) per call.
Inputs: ``hart_jax.random_init.prompt_draws`` (numpy seed 0), as ``sample_bench.py``.

One stand-in: the release's compiled extension ``hart_backend.fused_kernels`` (CUDA, built
separately) is replaced by torch's ``F.rms_norm``; its RoPE kernels are not on the sampling
path (calling one raises). ``sample_bench.py --compare-original`` runs this script in a
child process and prints the speed-up.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
import types
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PREFIX_LEN = 64


def stub_fused_kernels() -> None:
    """Register a ``hart_backend.fused_kernels`` module backed by torch ops."""
    import torch.nn.functional as F

    def rms_norm(out, x, weight, eps, use_quant):  # the extension writes into ``out``
        if use_quant:
            raise RuntimeError("quantised rms_norm is not supported by this stand-in")
        out.copy_(F.rms_norm(x, (x.shape[-1],), weight.to(x.dtype), eps))

    def off_path(name: str):
        def fail(*_a, **_k):
            raise RuntimeError(f"hart_backend.fused_kernels.{name} is not on the sampling path")

        return fail

    kernels = types.ModuleType("hart_backend.fused_kernels")
    kernels.rms_norm = rms_norm
    for name in ("fused_rope_forward_func", "fused_rope_backward_func", "fused_rope_with_pos_forward_func"):
        setattr(kernels, name, off_path(name))
    package = types.ModuleType("hart_backend")
    package.fused_kernels = kernels
    sys.modules.setdefault("hart_backend", package)
    sys.modules.setdefault("hart_backend.fused_kernels", kernels)


def release_models(preset: str, resolution: int, device):
    """The release's transformer (with its tokenizer) and a transformers Qwen2, random weights."""
    import torch
    from transformers import Qwen2Config as HFQwen2Config
    from transformers import Qwen2Model as HFQwen2Model

    from hart_jax.random_init import preset_configs

    src = os.environ.get("HART_SRC")
    if not src or not Path(src, "hart").is_dir():
        raise SystemExit(f"error: HART_SRC={src!r} is not a copy of the original hart source (no hart/ in it)")
    sys.path.insert(0, src)
    stub_fused_kernels()
    from hart.modules.models.autoencoder import HARTAutoEncoderWithDisc, HARTAutoEncoderWithDiscConfig
    from hart.modules.models.transformer import HARTForT2I, HARTForT2IConfig

    tok_cfg, t2i_cfg, q_cfg = preset_configs(preset, resolution)
    tok_kw = {**tok_cfg.to_hf_dict(), "hybrid": True, "test_mode": False}
    tok_kw.pop("model_type")
    t2i_kw = t2i_cfg.to_hf_dict()
    for k in ("model_type", "attention_impl", "rope_2d", "rope_theta"):
        t2i_kw.pop(k, None)
    t2i_kw["num_sampling_steps"] = str(t2i_kw["num_sampling_steps"])
    vae_config = HARTAutoEncoderWithDiscConfig(**tok_kw)
    # the transformer loads its tokenizer by path: build it from the config instead
    HARTAutoEncoderWithDisc.from_pretrained = classmethod(lambda cls, *_a, **_k: cls(vae_config))
    if device.type == "cpu":  # the release moves its tokenizer with .cuda()
        torch.nn.Module.cuda = lambda self, *_a, **_k: self
        torch.Tensor.cuda = lambda self, *_a, **_k: self
    q_kw = {f.name: getattr(q_cfg, f.name) for f in dataclasses.fields(q_cfg)
            if f.name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                          "num_attention_heads", "num_key_value_heads", "rms_norm_eps", "rope_theta",
                          "max_position_embeddings")}
    torch.manual_seed(0)
    with device:
        model = HARTForT2I(HARTForT2IConfig(**t2i_kw)).eval()
        text = HFQwen2Model(HFQwen2Config(**q_kw, tie_word_embeddings=True)).eval()
    return model, text, t2i_cfg, q_cfg


def main(argv: list[str] | None = None) -> dict:
    """Build, time every batch size, print JSON lines, write ``--json``."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=["tiny", "full"], default="full")
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    import torch

    from hart_jax.random_init import prompt_draws

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    t0 = time.perf_counter()
    model, text, t2i_cfg, q_cfg = release_models(args.preset, args.resolution, device)
    setup_s = time.perf_counter() - t0
    cuda = device.type == "cuda"
    res = {
        "impl": "original PyTorch HART (fp16 autocast)", "torch": torch.__version__, "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if cuda else None, "preset": args.preset,
        "resolution": t2i_cfg.patch_nums[-1] * 16 if args.preset == "full" else None,
        "setup_s": round(setup_s, 2), "runs": [],
    }
    print(json.dumps({k: v for k, v in res.items() if k != "runs"}), flush=True)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for batch in args.batch_sizes:
        ids, attn, mask, pos = (torch.from_numpy(np.asarray(x)).to(device) for x in
                                prompt_draws(batch, t2i_cfg.context_token, q_cfg.vocab_size, PREFIX_LEN))
        ids, pos = ids.long(), pos.long()

        def call(seed: int):
            with torch.inference_mode(), torch.autocast(device.type, dtype=torch.float16, enabled=cuda):
                hidden = text(ids, attention_mask=attn, output_hidden_states=True).hidden_states[-1]
                return model.autoregressive_infer_cfg(
                    B=batch, label_B=hidden[:, PREFIX_LEN:].float(), cfg=4.5, g_seed=seed, more_smooth=True,
                    context_position_ids=pos, context_mask=mask,
                )

        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        try:
            for w in range(args.warmup):
                img = call(w)
            sync()
            times = []
            for r in range(args.repeats):
                sync()
                t = time.perf_counter()
                img = call(100 + r)
                sync()
                times.append(time.perf_counter() - t)
        except torch.cuda.OutOfMemoryError:
            row = {"batch": batch, "error": "out of memory"}
            res["runs"].append(row)
            print(json.dumps(row), flush=True)
            torch.cuda.empty_cache()
            continue
        med = statistics.median(times)
        row = {"batch": batch, "median_s": round(med, 4), "images_per_s": round(batch / med, 3),
               "all_s": [round(t, 4) for t in times], "image_shape": list(img.shape),
               "finite": bool(torch.isfinite(img).all())}
        if cuda:
            row["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        res["runs"].append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    return res


if __name__ == "__main__":
    main()
