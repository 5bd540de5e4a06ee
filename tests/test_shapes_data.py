"""The built-in shapes dataset (``hart_jax.data.shapes``: generator, captions, CLI) and its
pixel checker (``hart_jax.data.shape_checker``)."""

from __future__ import annotations

import itertools
import re

import numpy as np
import pytest

from hart_jax.data import shape_checker, shapes
from hart_jax.data.shape_checker import accuracy, classify, matches
from hart_jax.data.shapes import BACKGROUNDS, COLOURS, SHAPES


def perturb(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A mild degradation: Gaussian blur (sigma 0.7 px), +-10 uniform noise per value and a
    +-12 colour shift per channel for the whole image."""
    from PIL import Image, ImageFilter

    a = np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(0.7)), np.float32)
    a = a + rng.uniform(-10, 10, a.shape) + rng.uniform(-12, 12, 3)
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def test_examples_are_deterministic():
    a, b = shapes.example(5, seed=3, resolution=32), shapes.example(5, seed=3, resolution=32)
    np.testing.assert_array_equal(a["image"], b["image"])
    assert {k: v for k, v in a.items() if k != "image"} == {k: v for k, v in b.items() if k != "image"}
    assert a["image"].shape == (32, 32, 3) and a["image"].dtype == np.uint8
    assert set(a) >= {"image", "caption", "label", "id", "colour", "shape", "background", "size"}
    few, many = list(shapes.examples(3, 32, seed=3)), list(shapes.examples(12, 32, seed=3))
    for x, y in zip(few, many[:3]):  # example i does not depend on the total count
        np.testing.assert_array_equal(x["image"], y["image"])
        assert x["caption"] == y["caption"] and x["id"] == y["id"]
    np.testing.assert_array_equal(many[5]["image"], a["image"])
    other = shapes.example(5, seed=4, resolution=32)
    assert other["spec"] != a["spec"]
    big = shapes.example(5, seed=3, resolution=64)  # the resolution changes only the pixels
    assert big["spec"] == a["spec"] and big["caption"] == a["caption"]
    assert [e["id"] for e in many] == list(range(12))


def test_class_ids_round_trip():
    assert shapes.NUM_CLASSES == len(COLOURS) * len(SHAPES) == 18
    ids = [shapes.class_id(c, s) for c, s in itertools.product(COLOURS, SHAPES)]
    assert ids == list(range(shapes.NUM_CLASSES))
    assert all(shapes.class_name(shapes.class_id(c, s)) == (c, s) for c, s in itertools.product(COLOURS, SHAPES))
    assert shapes.class_names()[4] == "green square"
    with pytest.raises(ValueError, match="class id"):
        shapes.class_name(shapes.NUM_CLASSES)
    e = shapes.example(2, 0, 16)
    assert e["label"] == shapes.class_id(e["colour"], e["shape"])


def test_captions_name_colour_and_shape_once():
    vocab_colours, vocab_shapes = set(COLOURS), set(SHAPES)
    seen = set()
    for i in range(300):
        e = shapes.example(i, 1, 16)
        cap = e["caption"]
        words = re.findall(r"[a-z]+", cap)
        assert cap == cap.lower() and cap.startswith("a ")
        assert words.count(e["colour"]) == 1 and words.count(e["shape"]) == 1, cap
        assert not (set(words) & vocab_colours) - {e["colour"]} and not (set(words) & vocab_shapes) - {e["shape"]}
        if "background" in words:
            assert cap.endswith(f"on a {e['background']} background")
        if "small" in words:
            assert e["size"] < shapes.SMALL
        if "large" in words:
            assert e["size"] > shapes.LARGE
        seen.add(re.sub("|".join(sorted(vocab_colours | vocab_shapes | set(BACKGROUNDS))), "X", cap))
    assert seen == {"a X X", "a small X X", "a large X X", "a X X on a X background",
                    "a small X X on a X background", "a large X X on a X background"}
    for p in shapes.PROMPTS:  # the demo prompts cover every colour and shape
        assert p == p.lower()
    assert {w for p in shapes.PROMPTS for w in p.split()} >= vocab_colours | vocab_shapes


def test_palette_is_well_separated():
    dist = lambda a, b: float(np.linalg.norm(np.subtract(a, b, dtype=np.float64)))  # noqa: E731
    bg_min = min(dist(c, b) for c in COLOURS.values() for b in BACKGROUNDS.values())
    fg_min = min(dist(COLOURS[a], COLOURS[b]) for a, b in itertools.combinations(COLOURS, 2))
    print(f"\nmin RGB distance background-colour {bg_min:.1f} (green/grey), colour-colour {fg_min:.1f} (blue/cyan)")
    assert bg_min >= 135.0 and fg_min >= 130.0
    chroma = lambda c: max(c) - min(c)  # noqa: E731
    assert max(chroma(b) for b in BACKGROUNDS.values()) < shape_checker.MIN_CHROMA  # backgrounds are neutral
    assert min(chroma(c) for c in COLOURS.values()) >= 150  # colours are saturated
    assert len(COLOURS) >= 6 and list(COLOURS)[:6] == ["red", "green", "blue", "yellow", "magenta", "cyan"]


@pytest.mark.parametrize("resolution", [16, 64])
def test_shape_lies_inside_the_image(resolution):
    for i in range(150):
        e = shapes.example(i, 2, resolution)
        spec, img = e["spec"], e["image"]
        lo, hi = shapes.SIZE_RANGE
        assert lo <= spec.size <= hi
        x0, y0, x1, y1 = (v * resolution for v in spec.box())
        assert min(x0, y0) >= 1.0 and max(x1, y1) <= resolution - 1.0
        bg = np.asarray(BACKGROUNDS[spec.background], np.uint8)
        ring = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
        assert (ring == bg).all()  # the outermost pixel ring is untouched background
    # the rendered area is the shape's (anti-aliasing preserves it) and the triangle points up
    s, r = 0.6, 64
    box = (12.0, 12.0, 12.0 + s * r, 12.0 + s * r)
    want = {"square": 1.0, "circle": np.pi / 4, "triangle": 0.5}
    for shape in SHAPES:
        cov = shapes.coverage(shape, box, r)
        assert abs(cov.sum() / (s * r) ** 2 - want[shape]) < 0.01, shape
    tri = shapes.coverage("triangle", box, r)
    assert tri[12:31].sum() < 0.4 * tri[31:51].sum()  # a third of the mass in the top half: apex up


def test_checker_accuracy_on_generated_images():
    rng = np.random.default_rng(0)
    results = {}
    for res in (32, 64):
        exs = list(shapes.examples(600, res, seed=11))
        results[res, "clean"] = accuracy([e["image"] for e in exs], exs)
        results[res, "perturbed"] = accuracy([perturb(e["image"], rng) for e in exs], [e["spec"] for e in exs])
    print("\nchecker accuracy (colour and shape, 600 images each):",
          ", ".join(f"{r}px {k} {v:.4f}" for (r, k), v in results.items()))
    for (res, kind), acc in results.items():
        assert acc >= (0.99 if kind == "clean" else 0.97), (res, kind, acc)


def test_checker_verdict_fields():
    e = shapes.example(0, 0, 64)
    v = classify(e["image"])
    assert (v.colour, v.shape) == (e["colour"], e["shape"])
    np.testing.assert_allclose(v.background_rgb, BACKGROUNDS[e["background"]])
    np.testing.assert_allclose(v.foreground_rgb, COLOURS[e["colour"]], atol=1)
    want_area = {"square": 1.0, "circle": np.pi / 4, "triangle": 0.5}[e["shape"]] * e["size"] ** 2
    assert abs(v.foreground_fraction - want_area) < 0.02
    assert v.scores[e["shape"]] > 0.9
    fills = {}
    for i in range(60):
        x = shapes.example(i, 0, 64)
        fills.setdefault(x["shape"], []).append(classify(x["image"]).fill_ratio)
    assert min(fills["square"]) > 0.9 and 0.7 < min(fills["circle"]) <= max(fills["circle"]) < 0.86
    assert max(fills["triangle"]) < 0.6


def test_checker_empty_and_other_backgrounds():
    for rgb in [(128, 128, 128), (240, 10, 10), (0, 0, 0)]:
        v = classify(np.full((32, 32, 3), rgb, np.uint8))
        assert v.colour is None and v.shape is None
    noise = np.clip(128 + np.random.default_rng(0).uniform(-12, 12, (48, 48, 3)), 0, 255).astype(np.uint8)
    assert classify(noise).colour is None
    speck = np.full((64, 64, 3), 128, np.uint8)
    speck[30:32, 30:32] = COLOURS["red"]  # 4 px < 1 % of the image: nothing there
    assert classify(speck).colour is None
    # a shape on a background that is itself a shape colour, or not one of BACKGROUNDS
    cases = [("green", "square", (220, 30, 30)), ("red", "circle", (40, 70, 230)), ("yellow", "triangle", (60, 40, 90)),
             ("cyan", "circle", (160, 150, 120)), ("blue", "triangle", (200, 220, 200))]
    for colour, shape, bg in cases:
        box = (8.0, 10.0, 8.0 + 36, 10.0 + 36)
        a = shapes.coverage(shape, box, 56)[..., None]
        img = np.rint(np.asarray(bg) + a * (np.subtract(COLOURS[colour], bg))).astype(np.uint8)
        v = classify(img)
        assert (v.colour, v.shape) == (colour, shape), (colour, shape, bg, v)
        assert matches(img, colour, shape) and not matches(img, colour, "square" if shape != "square" else "circle")
    with pytest.raises(ValueError, match="unknown colour"):
        matches(img, "purple", "circle")
    with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
        classify(np.zeros((8, 8), np.uint8))


def test_largest_component():
    m = np.zeros((10, 12), bool)
    m[1:3, 1:3] = True  # 4 px
    m[5:9, 4:11] = True  # 28 px
    m[5, 11] = True  # joins the big one
    m[0, 11] = True  # alone
    out = shape_checker.largest_component(m)
    assert out.sum() == 29 and out[5, 11] and not out[1, 1] and not out[0, 11]
    u = np.zeros((9, 9), bool)  # a U: connected only through the bottom row
    u[:, 0] = u[:, 8] = u[8] = True
    assert shape_checker.largest_component(u).sum() == u.sum()


# ---- CLI -----------------------------------------------------------------------------------


def test_cli_t2i_round_trip(tmp_path, capsys):
    from hart_jax.data.pipeline import open_source

    rc = shapes.main([str(tmp_path), "--num", "6", "--resolution", "32", "--seed", "4", "--name", "toy"])
    out = capsys.readouterr().out
    assert rc == 0 and f"wrote 6 examples to {tmp_path / 'toy' / '1.0.0'}" in out
    src = open_source(path=str(tmp_path / "toy" / "1.0.0"))
    assert len(src) == 6
    rows = {int(src[i]["id"]): src[i] for i in range(len(src))}
    assert sorted(rows) == list(range(6))
    for i, r in rows.items():
        e = shapes.example(i, 4, 32)
        np.testing.assert_array_equal(r["image"], e["image"])  # PNG: lossless
        assert r["caption"].decode() == e["caption"]
        assert matches(r["image"], e["colour"], e["shape"])


def test_cli_c2i_labels(tmp_path, capsys):
    import tensorflow_datasets as tfds

    assert shapes.main([str(tmp_path), "--num", "5", "--resolution", "16", "--kind", "c2i", "--split", "val"]) == 0
    capsys.readouterr()
    d = tmp_path / "shapes" / "1.0.0"
    builder = tfds.builder_from_directory(str(d))
    assert builder.info.features["label"].num_classes == shapes.NUM_CLASSES
    assert "caption" not in builder.info.features
    src = builder.as_data_source(split="val")
    labels = {int(src[i]["id"]): int(src[i]["label"]) for i in range(len(src))}
    assert labels == {i: shapes.example(i, 0, 16)["label"] for i in range(5)}
    assert (d.parent / "classes.txt").read_text().splitlines() == shapes.class_names()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--num", "0", "--resolution", "32"], "--num must be >= 1"),
        (["--num", "4", "--resolution", "8"], "--resolution must be >= 16"),
        (["--num", "4", "--resolution", "32", "--kind", "video"], "--kind must be 't2i' or 'c2i'"),
        (["--num", "4", "--resolution", "32", "--patch-nums", "1,x"], "--patch-nums must be"),
        (["--resolution", "32"], "the following arguments are required: --num"),
        (["--num", "four", "--resolution", "32"], "invalid int value"),
    ],
)
def test_cli_errors(tmp_path, capsys, args, message):
    out = tmp_path / "out"
    try:
        rc = shapes.main([str(out), *args])
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not out.exists()  # nothing written


def test_cli_refuses_an_existing_dataset(tmp_path, capsys):
    assert shapes.main([str(tmp_path), "--num", "2", "--resolution", "16"]) == 0
    d = tmp_path / "shapes" / "1.0.0"
    before = sorted((p.relative_to(tmp_path), p.stat().st_mtime_ns) for p in tmp_path.rglob("*"))
    capsys.readouterr()
    assert shapes.main([str(tmp_path), "--num", "3", "--resolution", "16"]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {d} already exists; remove it or choose another name\n"
    assert sorted((p.relative_to(tmp_path), p.stat().st_mtime_ns) for p in tmp_path.rglob("*")) == before


def test_every_cli_argument_has_help():
    from hart_jax.data import make_records

    for parser in (make_records.build_parser(), shapes.build_parser()):
        for action in parser._actions:
            assert action.help and "\n" not in action.help, (parser.prog, action.dest)
