"""Grad-CAM: the heatmap points at the region that decides a class, for every supported
family the default layer works, and `enrich explain` reads files, URLs (through the
SSRF guard) and records."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image, ImageDraw

from enrichment.cli import cli
from enrichment.errors import InvalidValue
from enrichment.model.classifier import Classifier, build_network, save_model_dir
from enrichment.model.explain import (
    DISPLAY_SIDE,
    class_activation_map,
    explain,
    find_layer,
    forward_with_features,
    target_layer_name,
)
from enrichment.model.spec import ClassSpec, ModelSpec
from enrichment.sources.records_file import Record
from enrichment.store.database import Database
from enrichment.store.writes import upsert_records

SIDE = 64  # resnet18's layer4 is 2x2 here: one cell per quadrant
SUPPRESS = 100.0
FAMILIES = [
    "resnet18",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "efficientnet_b0",
    "convnext_tiny",
    "densenet121",
    "regnet_y_400mf",
    "shufflenet_v2_x1_0",
]


def quadrant_network() -> torch.nn.Module:
    """A resnet18 whose `top_left` output fires only for a bright patch in the top-left
    quadrant and `top_right` only for one in the top-right quadrant.

    The weights are set by hand rather than trained (training takes minutes on a
    shared CPU): channel 0 carries brightness averaged over blocks that never
    straddle a quadrant, channel 1 is constant, and layer4's first convolution
    uses its zero padding, which only the top row and left column see, to keep
    each quadrant's brightness in its own cell and channel. The class is thus
    decided by one region, as Grad-CAM must then show.
    """
    network = build_network("resnet18", 2)
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.zero_()
        for module in network.modules():
            if isinstance(module, torch.nn.BatchNorm2d):  # identity in eval mode
                module.weight.fill_(1.0)
                module.running_mean.zero_()
                module.running_var.fill_(1.0)
        network.conv1.weight[0, :, 3:5, 3:5] = 1 / 12  # mean of 2x2 pixels, 3 colours
        network.bn1.bias[1] = 1.0  # the constant channel
        for block in (network.layer2[0], network.layer3[0]):  # 2x2 means, stride 2
            block.conv1.weight[0, 0, 1:, 1:] = 1 / 4
            block.conv1.weight[1, 1, 1, 1] = 1.0
            block.conv2.weight[0, 0, 1, 1] = 1.0
            block.conv2.weight[1, 1, 1, 1] = 1.0
        block = network.layer4[0]  # 4x4 -> 2x2: each output cell sums one quadrant
        for channel in (0, 1):
            block.conv1.weight[channel, 0, 1:, 1:] = 1.0
            block.conv2.weight[channel, channel, 1, 1] = 1.0
        # Above / left of a cell is padding only in the top row / left column.
        block.conv1.weight[0, 1, 0, 1] = -SUPPRESS  # not the top row: off
        block.conv1.weight[0, 1, 1, 0] = -SUPPRESS  # not the left column: off
        block.conv1.weight[1, 1, 0, 1] = -SUPPRESS  # not the top row: off
        block.conv1.weight[1, 1, 1, 0] = SUPPRESS  # the left column: off (with the bias)
        block.bn1.bias[1] = -SUPPRESS
        network.fc.weight[0, 0] = 40.0
        network.fc.weight[1, 1] = 40.0
        network.fc.bias[:] = -4.0
    return network


@pytest.fixture(scope="module")
def quadrant_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("quadrant-model")
    classes = (
        ClassSpec("top_left", "Top left", "http://example.org/concept/top-left", 0.5),
        ClassSpec("top_right", "Top right", "http://example.org/concept/top-right", 0.5),
    )
    spec = ModelSpec(
        name="quadrants",
        architecture="resnet18",
        input_size=SIDE,
        classes=classes,
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
    )
    save_model_dir(directory, spec, quadrant_network())
    return directory


def squares(*corners: tuple[int, int], size: tuple[int, int] = (160, 128)) -> bytes:
    """A black PNG with a bright square at each (x, y) fraction of its size."""
    image = Image.new("RGB", size, (0, 0, 0))
    draw = ImageDraw.Draw(image)
    side = size[0] // 5
    for fx, fy in corners:
        x, y = int(fx * size[0]), int(fy * size[1])
        draw.rectangle((x, y, x + side, y + side), fill=(250, 250, 250))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


TOP_LEFT, TOP_RIGHT, BOTTOM_LEFT = (0.12, 0.12), (0.62, 0.12), (0.12, 0.62)


def quadrant_means(heatmap: np.ndarray) -> dict[str, float]:
    half_h, half_w = heatmap.shape[0] // 2, heatmap.shape[1] // 2
    return {
        "top_left": float(heatmap[:half_h, :half_w].mean()),
        "top_right": float(heatmap[:half_h, half_w:].mean()),
        "bottom_left": float(heatmap[half_h:, :half_w].mean()),
        "bottom_right": float(heatmap[half_h:, half_w:].mean()),
    }


def peak_quadrant(heatmap: np.ndarray) -> str:
    row, column = np.unravel_index(np.argmax(heatmap), heatmap.shape)
    vertical = "top" if row < heatmap.shape[0] // 2 else "bottom"
    return f"{vertical}_{'left' if column < heatmap.shape[1] // 2 else 'right'}"


def test_heatmap_peaks_in_the_region_that_decides_the_class(quadrant_model: Path) -> None:
    classifier = Classifier.load(quadrant_model, torch.device("cpu"))

    (alone,) = explain(classifier, squares(TOP_LEFT))
    assert alone.key == "top_left" and alone.confidence > 0.9
    assert alone.heatmap.shape == (SIDE, SIDE)
    assert peak_quadrant(alone.heatmap) == "top_left" and alone.heatmap.max() == 1.0

    # Two bright squares: each class's heatmap is hot on its own and cold on the other.
    both = {item.key: item for item in explain(classifier, squares(TOP_LEFT, TOP_RIGHT))}
    assert set(both) == {"top_left", "top_right"}
    for key, item in both.items():
        means = quadrant_means(item.heatmap)
        assert peak_quadrant(item.heatmap) == key
        # Upsampling the 2x2 map bilinearly bleeds a little into the neighbours, no more.
        assert means[key] > 4 * max(v for k, v in means.items() if k != key)

    # A square where top_right would be if the heatmap were transposed decides nothing.
    with pytest.raises(InvalidValue, match=r"no class reaches its threshold") as raised:
        explain(classifier, squares(BOTTOM_LEFT))
    assert raised.value.field == "label_keys" and "--" not in str(raised.value)
    (asked,) = explain(classifier, squares(BOTTOM_LEFT), ["top_right"])
    assert asked.confidence < 0.5 and asked.heatmap.max() == 0.0


@pytest.mark.parametrize("architecture", FAMILIES)
def test_default_layer_of_each_supported_family(architecture: str) -> None:
    torch.manual_seed(0)
    network = build_network(architecture, 2).eval()
    layer = find_layer(network, target_layer_name(architecture))
    inputs = torch.rand(1, 3, SIDE, SIDE)
    logits, features = forward_with_features(network, layer, inputs)
    with torch.no_grad():  # the hook's copy changes nothing (DenseNet's in-place ReLU)
        assert torch.allclose(logits, network(inputs), atol=1e-5)
    assert features.dim() == 4 and min(features.shape[-2:]) >= 2  # still a spatial layout
    (gradient,) = torch.autograd.grad(logits[0, 0], features, retain_graph=True)
    assert gradient.abs().sum() > 0
    heatmap = class_activation_map(logits, features, 1, (SIDE, SIDE))
    assert heatmap.shape == (SIDE, SIDE) and np.isfinite(heatmap).all()
    assert heatmap.min() >= 0.0 and heatmap.max() <= 1.0


def test_layers_that_cannot_be_found_are_clear_errors() -> None:
    with pytest.raises(InvalidValue, match=r"no default Grad-CAM layer for vit_b_16") as raised:
        target_layer_name("vit_b_16")
    assert raised.value.field == "layer" and "--" not in str(raised.value)
    with pytest.raises(InvalidValue, match=r"no layer 'layer9'.*layer4") as raised:
        find_layer(build_network("resnet18", 2), "layer9")
    assert raised.value.field == "layer"


def invoke(*args: str, env: dict[str, str]):
    return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)


def test_explain_cli_for_a_file_an_url_and_a_record(
    quadrant_model: Path, image_host, tmp_path: Path
) -> None:
    picture = tmp_path / "scan.png"
    picture.write_bytes(squares(TOP_LEFT))
    database = f"sqlite:///{tmp_path}/enrich.sqlite3"
    env = {"ENRICH_MODEL": str(quadrant_model), "DATABASE_URL": database}
    out = tmp_path / "out"

    from_file = invoke("explain", str(picture), "--out", str(out), "--json", env=env)
    assert from_file.exit_code == 0, from_file.output
    (written,) = json.loads(from_file.stdout)
    assert written["label"] == "top_left" and written["confidence"] > 0.9
    assert Path(written["path"]) == out / "scan-top_left.png"
    overlay = np.asarray(Image.open(written["path"]).convert("RGB"), dtype=np.float64)
    assert overlay.shape == (DISPLAY_SIDE * 128 // 160, DISPLAY_SIDE, 3)  # the image's shape
    top = overlay[: overlay.shape[0] // 2]
    left, right = top[:, : DISPLAY_SIDE // 2], top[:, DISPLAY_SIDE // 2 :]
    assert left[..., 0].mean() > left[..., 2].mean()  # hot: red in the colour map
    assert right[..., 2].mean() > right[..., 0].mean()  # cold: blue
    caption = overlay[-12:, : DISPLAY_SIDE // 2]  # the band with the label and confidence
    assert caption.max() > 200 and np.median(caption) < 90

    url = image_host.add("/explain/both.png", squares(TOP_LEFT, TOP_RIGHT))
    blocked = invoke("explain", url, "--out", str(out), env=env)
    assert blocked.exit_code == 1
    assert "blocked_address" in blocked.output, "URLs go through the SSRF guard"
    allowed = {**env, "ENRICH_FETCH_ALLOW": "127.0.0.1"}
    from_url = invoke("explain", url, "--out", str(out), "--label", "top_right", env=allowed)
    assert from_url.exit_code == 0, from_url.output
    key, confidence, path = from_url.stdout.strip().split("\t")
    assert key == "top_right" and float(confidence) > 0.9
    assert Path(path) == out / "both-top_right.png"

    db = Database(database)
    db.ensure_schema()
    with db.transaction() as session:
        upsert_records(
            session,
            [Record("/quad/1", "quad", "http://data.europeana.eu/item/quad/1", url, "Museum")],
        )
    db.dispose()
    record_out = tmp_path / "record"
    from_record = invoke(
        "explain", "quad/1", "--out", str(record_out), "--layer", "layer4.0", "--json", env=allowed
    )
    assert from_record.exit_code == 0, from_record.output
    assert [
        (item["label"], Path(item["path"]).name) for item in json.loads(from_record.stdout)
    ] == [
        ("top_left", "quad_1-top_left.png"),
        ("top_right", "quad_1-top_right.png"),
    ]
    for key, side in (("top_left", slice(0, 100)), ("top_right", slice(-100, None))):
        drawn = np.asarray(Image.open(record_out / f"quad_1-{key}.png").convert("RGB"), float)
        assert drawn[:100, side, 0].mean() > drawn[:100, side, 2].mean(), key  # hot there

    for args, message in [
        (("/quad/2",), "/quad/2 is no file here, no http(s) URL, and no record in the database"),
        (("quad/nosuch.png",), "no such file: quad/nosuch.png"),
        ((str(picture), "--label", "map"), "no class map (its classes: top_left, top_right)"),
        ((str(picture), "--layer", "head"), "no layer 'head'"),
    ]:
        failed = invoke("explain", *args, "--out", str(out), env=allowed)
        assert failed.exit_code == 1 and message in failed.output, failed.output


def test_explain_into_a_path_that_cannot_be_written(quadrant_model: Path, tmp_path: Path) -> None:
    """One line on stderr and exit 1, and no partial file or temporary left behind."""
    picture = tmp_path / "scan.png"
    picture.write_bytes(squares(TOP_LEFT, TOP_RIGHT))
    env = {"ENRICH_MODEL": str(quadrant_model), "DATABASE_URL": f"sqlite:///{tmp_path}/e.db"}

    failed = invoke("explain", str(picture), "--out", "/proc/enrich/heatmaps", env=env)
    assert failed.exit_code == 1 and failed.stdout == ""
    assert failed.stderr.splitlines() == [
        "Error: cannot create the directory /proc/enrich/heatmaps:"
        " No such file or directory: /proc/enrich"
    ]

    # The second overlay's name is taken by a directory: the first is whole, no temporary stays.
    out = tmp_path / "out"
    (out / "scan-top_right.png").mkdir(parents=True)
    failed = invoke("explain", str(picture), "--out", str(out), env=env)
    assert failed.exit_code == 1 and failed.stdout == ""
    assert failed.stderr.splitlines() == [
        f"Error: cannot write {out}/scan-top_right.png: Is a directory"
    ]
    assert sorted(path.name for path in out.iterdir()) == [
        "scan-top_left.png",
        "scan-top_right.png",
    ]
    with Image.open(out / "scan-top_left.png") as written:
        written.verify()


def test_the_caption_tells_a_score_just_below_its_threshold_from_one_at_it() -> None:
    """0.4349 under a threshold of 0.435 is not a label: drawn to 2 decimals, both read 0.43."""
    from enrichment.model import explain as explaining

    image = Image.new("RGB", (320, 240), (90, 120, 60))
    heatmap = np.zeros((64, 64), dtype=np.float32)

    def drawn(confidence: float) -> np.ndarray:
        shown = explaining.Explanation("photograph", "Photograph", confidence, 0.435, heatmap)
        return np.asarray(explaining.overlay(image, shown))

    assert not np.array_equal(drawn(0.4349), drawn(0.4350))
    below = explaining.Explanation("photograph", "Photograph", 0.4349, 0.435, heatmap)
    assert explaining.caption(below) == "Photograph  0.4349  (threshold 0.435)"
    at = explaining.Explanation("photograph", "Photograph", 0.435, 0.5, heatmap)
    assert explaining.caption(at) == "Photograph  0.4350  (threshold 0.5)"


def test_overlays_of_names_that_differ_only_where_a_file_name_cannot_keep_them_differ(
    tmp_path: Path,
) -> None:
    """`/9/a b` and `/9/a_b` (or two ids alike in their first 80 characters) wrote the same
    file, the second replacing the first's overlays; an id kept whole keeps its plain name."""
    from enrichment.model import explain as explaining

    picture = io.BytesIO()
    Image.new("RGB", (40, 30), (90, 120, 60)).save(picture, format="PNG")
    shown = explaining.Explanation("map", "Map", 0.9, 0.5, np.zeros((8, 8), dtype=np.float32))
    long_id = "/9/" + "x" * 90
    names = ["/9/a b", "/9/a_b", "/9/a/b", "/9_a/b", long_id, long_id + "y", "/quad/1"]
    written = [
        explaining.write_overlays(
            explaining.ImageSource(name, picture.getvalue()), [shown], tmp_path
        )[0]
        for name in names
    ]
    assert len({path.name for path in written}) == len(names)
    assert written[1].name == "9_a_b-map.png" and written[6].name == "quad_1-map.png"
