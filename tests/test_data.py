"""Data layer: layout errors, CSV checks, robust image loading, the decode-once cache, statistics."""
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import utils


@pytest.fixture()
def data(tiny_data, tmp_path) -> Path:
    """A private copy of the tiny dataset that a test may break."""
    return Path(shutil.copytree(tiny_data, tmp_path / "d"))


def test_demo_dataset_has_known_noise_and_bad_files(tiny_data):
    noisy = pd.read_csv(tiny_data / "train.csv")
    clean = pd.read_csv(tiny_data / "train_clean.csv")
    assert (noisy.filename == clean.filename).all()
    assert (noisy.label != clean.label).sum() == round(0.25 * len(noisy))
    modes = {Image.open(tiny_data / "train" / "images" / f).mode for f in noisy.filename[:6]}
    assert {"L", "RGBA", "CMYK", "I;16", "P"} <= modes
    assert set(pd.read_csv(tiny_data / "test.csv").columns) == {"image_id", "filename"}


def test_good_layout_loads(tiny_data):
    lay, splits = utils.load_splits(tiny_data)
    assert lay.label_list == [1, 2, 3, 4]
    assert set(splits) == {"train", "val", "test"}
    assert all(Path(p).is_absolute() for p in splits["train"].path)


@pytest.mark.parametrize("move, expect", [
    (("val/images", "val_images"), ["found val_images/ but expected val/images/", "mv val_images val/images"]),
    (("train", "Train"), ["found Train/ but expected train/"]),
    (("train.csv", "train_labels.csv"), ["found train_labels.csv but expected train.csv"]),
    (("val/images", "val/Images"), ["found val/Images/ but expected val/images/"]),
])
def test_near_miss_layouts_name_what_was_found_and_the_fix(data, move, expect):
    (data / move[0]).rename(data / move[1])
    with pytest.raises(utils.DataLayoutError) as e:
        utils.check_layout(data)
    for text in expect:
        assert text in str(e.value)


def test_images_beside_the_csv(data):
    for f in (data / "val" / "images").iterdir():
        f.rename(data / f.name)
    shutil.rmtree(data / "val")
    with pytest.raises(utils.DataLayoutError, match="found images directly beside the CSVs"):
        utils.check_layout(data)


def _edit_csv(path, fn):
    df = pd.read_csv(path, dtype=str)
    fn(df).to_csv(path, index=False)


@pytest.mark.parametrize("edit, pattern", [
    (lambda d: d.drop(columns=["label"]), r"missing column\(s\) \['label'\].*header must be: image_id,filename,label"),
    (lambda d: pd.concat([d, d.iloc[[3]]]), r"2 rows share a filename, e.g. row 5 \('train_00003"),
    (lambda d: d.assign(label=d.label.where(d.index != 2, "rose")), r"1 labels are not integers, e.g. row 4 .*'rose'"),
    (lambda d: d.assign(label=d.label.where(d.index > 1, "7")), r"2 labels are not in label_list.txt, e.g. row 2"),
    (lambda d: d.assign(filename=d.filename.where(d.index != 9, "nope.jpg")), r"1 listed files are not in .*nope.jpg"),
])
def test_csv_checks_name_first_rows_and_count(data, edit, pattern):
    _edit_csv(data / "train.csv", edit)
    with pytest.raises((ValueError, FileNotFoundError), match=pattern):
        utils.load_splits(data)


def test_class_without_training_images_warns(data):
    (data / "label_list.txt").write_text("1\n2\n3\n4\n5\n")
    with pytest.warns(UserWarning, match=r"1 classes have no training image: \[5\]"):
        utils.load_splits(data)


def test_missing_label_list_falls_back_to_csv_labels(data):
    (data / "label_list.txt").unlink()
    with pytest.warns(UserWarning, match="label_list.txt not found"):
        lay = utils.check_layout(data)
    assert lay.label_list == [1, 2, 3, 4]


# ---- image modes ---------------------------------------------------------------------------

def _roundtrip(tmp_path, im, name, **save):
    p = tmp_path / name
    im.save(p, **save)
    return utils.load_rgb(p)[0]


def test_grayscale_palette_and_rgba_become_correct_rgb(tmp_path):
    g = _roundtrip(tmp_path, Image.new("L", (8, 8), 77), "g.png")
    assert g.mode == "RGB" and g.getpixel((0, 0)) == (77, 77, 77)
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 255))
    rgba.putpixel((0, 0), (0, 0, 255, 0))  # fully transparent: must come out as the white background
    out = _roundtrip(tmp_path, rgba, "a.png")
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((5, 5)) == (255, 0, 0)
    la = _roundtrip(tmp_path, Image.new("LA", (4, 4), (10, 0)), "la.png")
    assert la.getpixel((1, 1)) == (255, 255, 255)
    p = _roundtrip(tmp_path, Image.new("RGB", (8, 8), (0, 128, 255)).convert("P"), "p.png")
    assert p.mode == "RGB" and abs(p.getpixel((1, 1))[2] - 255) < 8


def test_sixteen_bit_is_rescaled_not_clipped(tmp_path):
    arr = np.full((6, 6), 257 * 100, np.uint16)
    arr[0, 0] = 65535
    out = _roundtrip(tmp_path, Image.fromarray(arr), "s.png")
    assert out.getpixel((3, 3)) == (100, 100, 100) and out.getpixel((0, 0)) == (255, 255, 255)


def test_cmyk_jpeg_colours(tmp_path):
    out = _roundtrip(tmp_path, Image.new("RGB", (16, 16), (200, 30, 30)).convert("CMYK"), "c.jpg", quality=95)
    r, g, b = out.getpixel((8, 8))
    assert out.mode == "RGB" and r > 150 and g < 80 and b < 80


def test_exif_orientation_is_applied(tmp_path):
    im = Image.new("RGB", (40, 20), (0, 0, 0))
    im.paste((255, 255, 255), (0, 0, 20, 20))  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # viewer must rotate 90 degrees clockwise
    out = _roundtrip(tmp_path, im, "r.jpg", exif=exif, quality=95)
    assert out.size == (20, 40)
    assert sum(out.getpixel((10, 5))) > 600 and sum(out.getpixel((10, 35))) < 100


def test_tiny_images_work(tmp_path):
    p = tmp_path / "t.png"
    Image.new("RGB", (3, 1), (9, 9, 9)).save(p)
    dec = utils.decode_images([p], 16)
    assert dec["tensor"].shape == (1, 3, 16, 16) and dec["ok"].all()


def test_truncated_file_is_skipped_by_name(tiny_data, tmp_path):
    df = pd.read_csv(tiny_data / "train.csv")
    paths = [tiny_data / "train" / "images" / f for f in df.filename[:8]]
    with pytest.warns(UserWarning, match=r"1 image\(s\) could not be read and are skipped: train_00006.jpg"):
        dec = utils.decode_images(paths, 24)
    assert dec["ok"].tolist() == [True] * 6 + [False, True]
    assert dec["tensor"].shape[0] == 7  # no dummy tensor stands in for the bad file


# ---- decode-once cache -------------------------------------------------------------------------

def test_cache_is_reused_and_invalidated(data, tmp_path, monkeypatch):
    paths = sorted((data / "val" / "images").iterdir())
    first = utils.decode_images(paths, 24, tmp_path / "cache", "val")
    assert len(list((tmp_path / "cache").glob("val_24px_*.pt"))) == 1
    calls = []
    real = utils.load_rgb
    monkeypatch.setattr(utils, "load_rgb", lambda *a, **k: calls.append(a) or real(*a, **k))
    again = utils.decode_images(paths, 24, tmp_path / "cache", "val")
    assert calls == [] and (again["tensor"] == first["tensor"]).all()
    st = os.stat(paths[0])
    os.utime(paths[0], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a changed file re-decodes
    utils.decode_images(paths, 24, tmp_path / "cache", "val")
    assert len(calls) == len(paths)


def test_stats_match_an_independent_full_resolution_computation(tiny_data, tmp_path):
    lay, splits = utils.load_splits(tiny_data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stats = utils.compute_stats(splits["train"].path, tmp_path, 32, tiny_data)
    assert stats == {k: v for k, v in utils.json.loads((tmp_path / "data" / "stats.json").read_text()).items()}
    px = []
    for p in splits["train"].path:
        try:
            px.append(np.asarray(utils.load_rgb(p)[0], np.float64).reshape(-1, 3) / 255)
        except OSError:
            pass
    px = np.concatenate(px)
    assert np.allclose(stats["mean"], px.mean(0), atol=0.005)
    assert np.allclose(stats["std"], px.std(0), atol=0.01)


def test_near_duplicates_found(tiny_data):
    _, splits = utils.load_splits(tiny_data)
    df = splits["val"].iloc[:4].copy()
    dec = utils.decode_images(df.path, 32)
    x = torch.cat([dec["tensor"], dec["tensor"][:1]])  # image 0 twice
    df = pd.concat([df, df.iloc[[0]].assign(filename="copy.jpg", label=df.label.iat[0] % 4 + 1)], ignore_index=True)
    rep = utils.duplicate_report(df, x)
    hit = rep[(rep.file_b == "copy.jpg")]
    assert len(hit) == 1 and hit.distance.iat[0] == 0 and hit.labels_disagree.iat[0]


def test_kaggle_input_is_found(tmp_path):
    (tmp_path / "comp" / "cusehacks").mkdir(parents=True)
    (tmp_path / "comp" / "cusehacks" / "train.csv").write_text("image_id,filename,label\n")
    assert utils.find_kaggle_data(tmp_path) == tmp_path / "comp" / "cusehacks"
    assert utils.find_kaggle_data(tmp_path / "none") is None
