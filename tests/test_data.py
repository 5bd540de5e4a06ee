"""Data: the array_record writer and ``make_records`` CLI (read back with
``tfds.data_source``, no TensorFlow), and the grain pipeline (resize/crop, seeded order,
per-host sharding, iterator state)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hart_jax.data.pipeline import make_loader, open_source, resize_crop
from hart_jax.data.records import write_records
from tests import train_data

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def t2i_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("records")
    train_data.write(d, 24, kind="t2i", name="shapes", size=40)
    return d


def test_tensorflow_is_not_needed():
    import importlib.util

    assert importlib.util.find_spec("tensorflow") is None  # the reads below run without it


def test_records_round_trip(t2i_dir):
    src = open_source("shapes", str(t2i_dir), "train")
    assert len(src) == 24
    rows = {int(src[i]["id"]): src[i] for i in range(len(src))}
    assert sorted(rows) == list(range(24))
    ref = train_data.examples(24, size=40)
    for i in (0, 7, 23):
        r = rows[i]
        np.testing.assert_array_equal(r["image"], ref[i]["image"])  # PNG: lossless
        assert r["caption"].decode() == ref[i]["caption"]
        np.testing.assert_array_equal(r["context"], ref[i]["context"])
        np.testing.assert_array_equal(r["context_mask"], ref[i]["context_mask"])
        np.testing.assert_array_equal(r["context_position_ids"], ref[i]["context_position_ids"])
    with pytest.raises(FileExistsError, match="already exists"):
        write_records(t2i_dir, train_data.examples(2), name="shapes", context_shape=(6, 24))


def test_records_bad_input(tmp_path):
    with pytest.raises(ValueError, match="context has shape"):
        write_records(tmp_path, [{"image": np.zeros((8, 8, 3), np.uint8), "context": np.zeros((2, 2))}],
                      context_shape=(6, 24))
    with pytest.raises(ValueError, match="kind must be"):
        write_records(tmp_path, [], kind="video")


def test_codes_records(tmp_path):
    rows = [dict(r, codes=np.arange(66) % 7, last_layer_gt=np.full((36, 8), r["id"], np.float32))
            for r in train_data.examples(4, size=24, kind="c2i")]
    write_records(tmp_path, rows, name="codes", kind="c2i", num_classes=4, codes_shape=(66, 36, 8))
    loader = make_loader({"name": "codes", "data_dir": str(tmp_path), "codes": True, "shuffle": False},
                         kind="c2i", resolution=24, global_batch=2, seed=0)
    b = next(iter(loader))
    assert set(b) == {"id", "codes", "last_layer_gt", "label"}
    assert b["codes"].shape == (2, 66) and b["codes"].dtype == np.int32
    assert b["last_layer_gt"].shape == (2, 36, 8)
    np.testing.assert_array_equal(b["last_layer_gt"][:, 0, 0], b["id"])


def test_make_records_cli(tmp_path):
    from PIL import Image

    imgs = tmp_path / "imgs"
    (imgs / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, rel in enumerate(["a.png", "b.jpg", "sub/c.png"]):
        arr = train_data.draw("circle", (200, 30, 30), 20 + 4 * i, rng)
        img = Image.fromarray(arr)
        (img.convert("L") if rel == "sub/c.png" else img).save(imgs / rel)  # a grayscale one gets re-encoded
        (imgs / rel).with_suffix(".txt").write_text(f"caption {i}\n")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "hart_jax.data.make_records", str(imgs), str(out), "--name", "mine"]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert p.returncode == 0, p.stderr[-2000:]
    src = open_source("mine", str(out))
    caps = sorted(src[i]["caption"].decode() for i in range(len(src)))
    assert caps == ["caption 0", "caption 1", "caption 2"]
    shapes = {src[i]["caption"].decode(): src[i]["image"].shape for i in range(3)}
    assert shapes["caption 2"] == (28, 28, 3)
    # ImageNet layout -> labels by sorted class name
    inet = tmp_path / "inet"
    for cls in ("n02", "n01"):
        (inet / cls).mkdir(parents=True)
        Image.fromarray(train_data.draw("square", (0, 0, 200), 16, rng)).save(inet / cls / "x.JPEG")
    p = subprocess.run([sys.executable, "-m", "hart_jax.data.make_records", str(inet), str(out), "--name", "inet",
                        "--kind", "c2i"], capture_output=True, text=True, cwd=REPO)
    assert p.returncode == 0, p.stderr[-2000:]
    assert (out / "inet" / "classes.txt").read_text().split() == ["n01", "n02"]
    src = open_source("inet", str(out))
    assert sorted(int(src[i]["label"]) for i in range(2)) == [0, 1]
    # errors: a missing caption, an existing output
    (imgs / "d.png").write_bytes((imgs / "a.png").read_bytes())
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert p.returncode == 2 and "no caption file" in p.stderr


def test_resize_crop():
    img = np.zeros((40, 80, 3), np.uint8)
    img[:, 30:50] = 255  # a bright band in the middle
    out = resize_crop(img, 20)
    assert out.shape == (20, 20, 3) and out.dtype == np.uint8
    assert out[:, 10].min() > 200 and out[:, 0].max() < 30  # centred
    crops = {resize_crop(img, 20, np.random.default_rng(s)).tobytes() for s in range(6)}
    assert len(crops) > 1
    small = resize_crop(np.full((10, 12, 3), 7, np.uint8), 16)  # upscaling
    assert small.shape == (16, 16, 3) and np.all(small == 7)


def ids(loader, n):
    it = iter(loader)
    return [next(it)["id"].tolist() for _ in range(n)]


def test_loader_order_seed_and_shards(t2i_dir):
    cfg = {"name": "shapes", "data_dir": str(t2i_dir)}
    kw = dict(kind="t2i", resolution=24, global_batch=4)
    a, b = ids(make_loader(cfg, seed=3, **kw), 8), ids(make_loader(cfg, seed=3, **kw), 8)
    c = ids(make_loader(cfg, seed=4, **kw), 8)
    assert a == b and a != c
    flat = [i for batch in a[:6] for i in batch]
    assert sorted(flat) == list(range(24))  # one epoch = a permutation
    assert sorted(i for batch in a[6:] for i in batch) != list(range(8))  # epoch 2 reshuffles (not identity)
    # two hosts: each reads its half of the same global batch one host reads (rows [0, 2) and
    # [2, 4)), through the epoch boundary too (batch 7 is the second epoch's second batch)
    s0 = ids(make_loader(cfg, seed=3, shard_index=0, shard_count=2, **kw), 8)
    s1 = ids(make_loader(cfg, seed=3, shard_index=1, shard_count=2, **kw), 8)
    assert all(len(x) == 2 for x in s0 + s1)
    assert [x + y for x, y in zip(s0, s1)] == a
    assert not set(sum(s0[:6], [])) & set(sum(s1[:6], []))
    rcfg = dict(cfg, random_crop=True, random_flip=True)  # per-record RNG: same crops / flips as one host
    one = next(iter(make_loader(rcfg, seed=3, **kw)))["image"]
    halves = [next(iter(make_loader(rcfg, seed=3, shard_index=i, shard_count=2, **kw)))["image"] for i in (0, 1)]
    np.testing.assert_array_equal(np.concatenate(halves), one)
    batch = next(iter(make_loader(cfg, seed=3, **kw)))
    assert batch["image"].shape == (4, 24, 24, 3) and batch["image"].dtype == np.uint8
    assert batch["context"].shape == (4, 6, 24) and batch["context"].dtype == np.float32
    assert batch["context_mask"].dtype == bool and batch["context_position_ids"].dtype == np.int32


def test_loader_iterator_state(t2i_dir):
    cfg = {"name": "shapes", "data_dir": str(t2i_dir), "random_flip": True, "random_crop": True}
    kw = dict(kind="t2i", resolution=24, global_batch=4, seed=1)
    it = iter(make_loader(cfg, **kw))
    for _ in range(3):
        next(it)
    state = it.get_state()
    rest = [next(it) for _ in range(4)]
    it2 = iter(make_loader(cfg, **kw))
    it2.set_state(state)
    again = [next(it2) for _ in range(4)]
    for x, y in zip(rest, again):
        assert x["id"].tolist() == y["id"].tolist()
        np.testing.assert_array_equal(x["image"], y["image"])  # same crops and flips
    json.loads(state.decode() if isinstance(state, bytes) else state)


def test_loader_errors(t2i_dir):
    with pytest.raises(ValueError, match="fewer than one batch"):
        make_loader({"name": "shapes", "data_dir": str(t2i_dir)}, kind="t2i", resolution=24, global_batch=64, seed=0)
    with pytest.raises(ValueError, match="data.name"):
        make_loader({}, kind="t2i", resolution=24, global_batch=4, seed=0)
    it = iter(make_loader({"name": "shapes", "data_dir": str(t2i_dir), "context": "bogus"}, kind="t2i",
                          resolution=24, global_batch=4, seed=0))
    with pytest.raises(Exception, match="data.context must be"):
        next(it)


def test_make_records_with_tokenizer_codes(tmp_path):
    """``--tokenizer`` stores the tokenizer's codes; they equal encoding the resized images."""
    import jax

    from configs.tokenizer import get_config as tok_config
    from hart_jax.checkpoint import save_converted
    from hart_jax.data import make_records
    from hart_jax.models.autoencoder import HARTAutoEncoder, TokenizerConfig
    from hart_jax.train.loop import random_tokenizer_variables
    from hart_jax.train.objective import tokenize_images

    d = dict(tok_config("tiny"))
    d["ch_mult"], d["v_patch_nums"] = tuple(d["ch_mult"]), tuple(d["v_patch_nums"])
    tcfg = TokenizerConfig(**d)
    model = HARTAutoEncoder(tcfg)
    variables = random_tokenizer_variables(model, 24, seed=5)
    tok_dir = save_converted(tmp_path / "tok", variables, tcfg.to_hf_dict(), kind="tokenizer")
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    rng = np.random.default_rng(0)
    from PIL import Image

    for i in range(3):
        Image.fromarray(train_data.draw(train_data.SHAPES[i], (200, 40 * i, 30), 36, rng)).save(imgs / f"{i}.png")
        (imgs / f"{i}.txt").write_text(f"shape {i}")
    assert make_records.main([str(imgs), str(tmp_path / "out"), "--name", "coded", "--tokenizer", str(tok_dir),
                              "--batch-size", "2"]) == 0
    src = open_source("coded", str(tmp_path / "out"))
    rows = sorted((src[i] for i in range(3)), key=lambda r: r["caption"])
    pn = tcfg.v_patch_nums
    assert rows[0]["codes"].shape == (sum(p * p for p in pn),) and rows[0]["last_layer_gt"].shape == (36, 8)
    images = np.stack([resize_crop(np.asarray(Image.open(imgs / f"{i}.png").convert("RGB")), 24) for i in range(3)])
    idx, frest, _ = tokenize_images(model, variables, jax.numpy.asarray(images), pn)
    codes = np.concatenate([np.asarray(i) for i in idx], axis=1)
    for i, r in enumerate(rows):
        np.testing.assert_array_equal(r["codes"], codes[i])
        np.testing.assert_allclose(r["last_layer_gt"], np.asarray(frest)[i], atol=1e-5)
    assert len(set(codes[:, -36:].ravel().tolist())) > 3  # the random tokenizer gives varied codes
