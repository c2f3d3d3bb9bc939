"""Rebuild the demo's real-image sample from Debian and PyPI packages (maintainers only).

`make demo` does not run this: its output, `demo/sample/`, is committed (small
resized copies). It documents and reproduces where every image came from:

- drawings and maps: Debian `openclipart-png` (public domain dedication);
- photographs: Debian `mate-backgrounds` (GPL-2+) and `plasma-workspace-wallpapers`
  (LGPL-3 / CC-BY-SA-4.0, per image), scikit-learn's sample images and
  matplotlib's `grace_hopper.jpg`.

Images are split by source file into train / validation / test (for
`enrich model train`, `calibrate` and `evaluate`) and the demo collection,
so the collection the demo enriches was never seen in training. Photographs
are large, so each training photograph yields several distinct crops, all in
the same group (the training split keeps a group together).

Usage: python demo/build_sample.py   (needs apt-get and network access to Debian)
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

HERE = Path(__file__).resolve().parent
OUT = HERE / "sample"
MAX_SIDE = 320
PACKAGES = ("openclipart-png", "mate-backgrounds", "plasma-workspace-wallpapers")
NOT_MAPS = {
    "arkansas_symbol_ganson",
    "ayers_rock_ganson",
    "basque_patricia_fidi_01",
    "calebasse_01",
    "canada_umbrella_ganson",
    "earth_and_north_star_dan_01",
    "earth_globe_dan_gerhrads_01",
    "eclipse_josu_alcalde_ba_01r",
    "eclipse_josu_alcalde_bas_",
    "eclipse_josu_alcalde_go_01r",
    "eiffel_tower_michael_ja_r",
    "garmin_handheld_gps_gera_01",
    "globe_01",
    "globe_marcelo_staudt_",
    "gps_geko__ganson",
    "gps_geko_ganson1",
    "magelan_handheld_gps_ger_01",
    "moon_charles_mccolm_01",
    "mount_hood_dan_gerhards_01",
    "mountain_seal_mitchell_j_",
    "northern_hemisphere_glo_",
    "planet_costea_bogdan_r",
    "planet_earth_dan_gerhard_01",
    "pseudo_globe_twilight_",
    "shi_ken_01",
    "spyglass_vladimir_hernan_01",
    "svg_globe",
    "svg_globe_blue",
    "svg_globe_green",
    "symbol_for_a_church_on__01",
    "teide_clemente_01",
    "war_drum_enrique_meza_c_01",
    "war_drum_enrique_meza_c_02",
    "wire_globe_01",
    "amrum_outline_t._eitel_01",
}
DRAWING_CATEGORIES = (
    "animals",
    "buildings",
    "computer",
    "containers",
    "education",
    "electronics",
    "food",
    "office",
    "people",
    "plants",
    "recreation",
    "science",
    "tools",
    "transportation",
)
# Photographs, chosen by looking at each wallpaper: the others are digital art.
PLASMA_PHOTOS = (
    "BytheWater",
    "ColdRipple",
    "DarkestHour",
    "EveningGlow",
    "FallenLeaf",
    "Grey",
    "Kite",
    "OneStandsOut",
    "Path",
    "Volna",
    "summer_1am",
)
MATE_PHOTOS = (
    "Aqua",
    "Blinds",
    "Dune",
    "FreshFlower",
    "Garden",
    "GreenMeadow",
    "LadyBird",
    "RainDrops",
    "Storm",
    "TwoWings",
    "Wood",
    "YellowFlower",
)
# Kept for the demo collection, never trained on.
COLLECTION_PHOTOS = {
    "sklearn:china.jpg",
    "sklearn:flower.jpg",
    "matplotlib:grace_hopper.jpg",
    "plasma:Grey",
    "mate:TwoWings",
    "mate:YellowFlower",
}


@dataclass(frozen=True)
class Source:
    key: str
    path: Path
    labels: tuple[str, ...]
    package: str
    licence: str


def fetch_packages(workdir: Path) -> Path:
    root = workdir / "root"
    for package in PACKAGES:
        subprocess.run(["apt-get", "download", package], cwd=workdir, check=True)
    for deb in workdir.glob("*.deb"):
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    return root


def plasma_licence(root: Path, name: str) -> str:
    metadata = json.loads((root / "usr/share/wallpapers" / name / "metadata.json").read_text())
    plugin = metadata["KPlugin"]
    return f"{plugin.get('License', 'GPL-2+')}, {plugin['Authors'][0]['Name']}"


def largest_image(directory: Path) -> Path:
    return max(directory.glob("*.*"), key=lambda p: p.stat().st_size)


def sources(root: Path) -> list[Source]:
    import matplotlib
    import sklearn.datasets

    found: list[Source] = []
    clipart = root / "usr/share/openclipart/png"
    pd = "public domain dedication (openclipart)"
    for path in sorted((clipart / "geography").glob("*.png")):
        if path.stem not in NOT_MAPS:
            found.append(
                Source(f"clipart:{path.stem}", path, ("drawing", "map"), "openclipart-png", pd)
            )
    for category in DRAWING_CATEGORIES:
        for path in sorted((clipart / category).rglob("*.png"))[:14]:
            found.append(Source(f"clipart:{path.stem}", path, ("drawing",), "openclipart-png", pd))
    for name in PLASMA_PHOTOS:
        images = root / "usr/share/wallpapers" / name / "contents/images"
        found.append(
            Source(
                f"plasma:{name}",
                largest_image(images),
                ("photograph",),
                "plasma-workspace-wallpapers",
                plasma_licence(root, name),
            )
        )
    for name in MATE_PHOTOS:
        path = root / "usr/share/backgrounds/mate/nature" / f"{name}.jpg"
        found.append(
            Source(
                f"mate:{name}",
                path,
                ("photograph",),
                "mate-backgrounds",
                "GPL-2+ (see mate-backgrounds' copyright file)",
            )
        )
    sklearn_images = Path(sklearn.datasets.__file__).parent / "images"
    for name in ("china.jpg", "flower.jpg"):
        found.append(
            Source(
                f"sklearn:{name}",
                sklearn_images / name,
                ("photograph",),
                "scikit-learn (PyPI)",
                "see sklearn/datasets/images/README.txt",
            )
        )
    hopper = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    found.append(
        Source(
            "matplotlib:grace_hopper.jpg",
            hopper,
            ("photograph",),
            "matplotlib (PyPI)",
            "public domain (U.S. Navy photograph)",
        )
    )
    return found


def save(image: Image.Image, target: Path) -> None:
    image.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.LANCZOS)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.suffix == ".png":
        image.save(target, optimize=True)
    else:
        image.convert("RGB").save(target, quality=85, optimize=True)


def crops(image: Image.Image, count: int, rng: random.Random) -> list[Image.Image]:
    """Distinct regions of one large photograph, at several scales."""
    width, height = image.size
    found = [image]
    for _ in range(count - 1):
        scale = rng.uniform(0.35, 0.6)
        w, h = int(width * scale), int(height * scale)
        left, top = rng.randint(0, width - w), rng.randint(0, height - h)
        found.append(image.crop((left, top, left + w, top + h)))
    return found


def split_of(source: Source) -> str:
    if source.key in COLLECTION_PHOTOS:
        return "collection"
    if source.package == "openclipart-png":
        bucket = int(hashlib.sha256(source.key.encode()).hexdigest(), 16) % 20
        return {
            0: "collection",
            1: "collection",
            2: "validation",
            3: "validation",
            4: "test",
            5: "test",
            6: "test",
        }.get(bucket, "train")
    bucket = int(hashlib.sha256(source.key.encode()).hexdigest(), 16) % 5
    return {0: "validation", 1: "test"}.get(bucket, "train")


def main() -> None:
    rng = random.Random(2021)
    shutil.rmtree(OUT, ignore_errors=True)
    rows: list[dict[str, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = fetch_packages(Path(tmp))
        for source in sources(root):
            split = split_of(source)
            image = Image.open(source.path)
            image.load()
            is_photo = "photograph" in source.labels
            pieces = (
                crops(image.convert("RGB"), 4, rng)
                if is_photo and split != "collection"
                else [image]
            )
            stem = source.key.replace(":", "_").replace(".", "_")
            for index, piece in enumerate(pieces):
                suffix = ".jpg" if is_photo else ".png"
                relative = (
                    Path("images")
                    / split
                    / f"{stem}{'' if index == 0 else f'_crop{index}'}{suffix}"
                )
                save(piece, OUT / relative)
                rows.append(
                    {
                        "image": str(relative),
                        "labels": " ".join(source.labels),
                        "group": source.key,
                        "split": split,
                        "package": source.package,
                        "source": source.path.name,
                        "licence": source.licence,
                    }
                )
    with (OUT / "manifest.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    for split in ("train", "validation", "test", "collection"):
        with (OUT / f"{split}.csv").open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["image", "labels", "group"])
            writer.writeheader()
            writer.writerows(
                {k: row[k] for k in ("image", "labels", "group")}
                for row in rows
                if row["split"] == split
            )
    counts = {
        split: sum(row["split"] == split for row in rows)
        for split in ("train", "validation", "test", "collection")
    }
    print(f"wrote {len(rows)} images to {OUT}: {counts}")


if __name__ == "__main__":
    main()
