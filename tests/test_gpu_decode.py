"""Batched decoding for the model (`enrichment.model.batch_decode`), on a machine without a GPU.

Without CUDA the CPU path is chosen and gives exactly `decode`'s output. The GPU
path's own code (torchvision's `decode_jpeg`, resize and normalisation as
tensors) runs here with the CPU as its device: its output must stay within the
decode tolerance of benchmarks/bench_decode.py, with the EXIF orientation
applied, and every file it must not take (not a JPEG, CMYK, cut short, broken)
must get the CPU path's answer, in the batch's order.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from enrichment.media.decode import ImageError, Preprocessing, decode
from enrichment.model.batch_decode import BatchDecoder
from enrichment.model.classifier import Classifier

IMAGES = Path(__file__).resolve().parent / "data" / "images"
TOLERANCE = 2.0  # mean |difference| in 0..255 pixel units: benchmarks/bench_decode.py's
IMAGENET = Preprocessing(96, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
CPU = torch.device("cpu")


def read(name: str) -> bytes:
    return (IMAGES / name).read_bytes()


def photo(seed: int, size: tuple[int, int] = (400, 300)) -> bytes:
    """A smooth JPEG picture with edges, like a preview from the thumbnail service."""
    rng = np.random.default_rng(seed)
    light = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    image = Image.fromarray(light).resize(size, Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def as_pixels(inputs: np.ndarray) -> np.ndarray:
    """Normalised (3, H, W) input back to 0..255 pixel units."""
    mean = np.asarray(IMAGENET.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(IMAGENET.std, dtype=np.float32)[:, None, None]
    return (inputs * std + mean) * 255.0


def test_without_cuda_the_cpu_path_is_chosen_and_equals_decode(tiny_model: Path) -> None:
    classifier = Classifier.load(tiny_model, device=CPU)
    decoder = classifier.batch_decoder()
    assert not decoder.on_gpu and decoder.jpeg_device is None
    bodies = [photo(1), read("hopper.jpg"), read("hopper_orientation_6.jpg")]
    decoded = decoder.decode(bodies)
    size = classifier.spec.input_size
    assert decoded.errors == {} and decoded.inputs.shape == (3, 3, size, size)
    for row, body in zip(decoded.inputs.numpy(), bodies, strict=True):
        assert np.array_equal(row, decode(body, classifier.spec.preprocessing))
    # The decoded batch goes straight to the model, as a tensor.
    assert classifier.scores(decoded.inputs).shape == (3, len(classifier.spec.classes))


@pytest.mark.parametrize(
    "name", ["hopper.jpg", "hopper_gray.jpg", "hopper_orientation_6.jpg", "app13-multiple.jpg"]
)
def test_the_tensor_path_agrees_with_decode_within_the_tolerance(name: str) -> None:
    data = read(name)
    decoded = BatchDecoder(IMAGENET, CPU, jpeg_device=CPU).decode([data])
    assert decoded.errors == {}
    tensor_pixels = as_pixels(decoded.inputs.numpy()[0])
    cpu_pixels = as_pixels(decode(data, IMAGENET))
    assert np.abs(tensor_pixels - cpu_pixels).mean() <= TOLERANCE


def test_the_tensor_path_turns_images_by_their_exif_orientation() -> None:
    decoder = BatchDecoder(IMAGENET, CPU, jpeg_device=CPU)
    upright, turned = decoder.decode([read("hopper.jpg"), read("hopper_orientation_6.jpg")]).inputs
    stored = decoder.decode([_without_exif(read("hopper_orientation_6.jpg"))]).inputs[0]
    # Same picture up to JPEG noise once turned; far apart as stored.
    assert np.abs(as_pixels(turned.numpy()) - as_pixels(upright.numpy())).mean() < 8
    assert np.abs(as_pixels(stored.numpy()) - as_pixels(upright.numpy())).mean() > 30


def test_files_the_tensor_path_must_not_take_get_the_cpu_paths_answer_in_order() -> None:
    good = photo(2)
    whole = read("hopper.jpg")
    bodies = [
        good,
        b"not an image at all",
        whole[: len(whole) // 2],  # cut short: Pillow says truncated, never grey input
        read("pil_sample_cmyk.jpg"),  # CMYK: Pillow's conversion
        read("pil123rgba.png"),  # not a JPEG: Pillow, composited on white
        photo(3),
    ]
    decoded = BatchDecoder(IMAGENET, CPU, jpeg_device=CPU).decode(bodies)
    assert {position: error.reason for position, error in decoded.errors.items()} == {
        1: "not_an_image",
        2: "truncated",
    }
    assert decoded.inputs.shape == (4, 3, 96, 96)
    expected = [decode(body, IMAGENET) for body in (bodies[0], bodies[3], bodies[4], bodies[5])]
    for row, reference in zip(decoded.inputs.numpy(), expected, strict=True):
        assert np.abs(as_pixels(row) - as_pixels(reference)).mean() <= TOLERANCE
    # The CMYK JPEG and the PNG came through Pillow: exactly decode's output.
    assert np.array_equal(decoded.inputs.numpy()[1], expected[1])
    assert np.array_equal(decoded.inputs.numpy()[2], expected[2])


def test_a_jpeg_the_tensor_decoder_refuses_sends_its_batch_to_the_cpu_path() -> None:
    good, other = photo(4), photo(5)
    broken = _without_segment(good, 0xDB)  # no quantisation table: the header still reads
    decoded = BatchDecoder(IMAGENET, CPU, jpeg_device=CPU).decode([good, broken, other])
    assert decoded.errors[1].reason == decode_reason(broken)
    # The whole batch took the CPU path: exactly decode's output, in order.
    assert decoded.inputs.shape == (2, 3, 96, 96)
    assert np.array_equal(decoded.inputs.numpy()[0], decode(good, IMAGENET))
    assert np.array_equal(decoded.inputs.numpy()[1], decode(other, IMAGENET))


def test_the_pixel_cap_and_the_allow_list_come_before_any_tensor_decode() -> None:
    decoder = BatchDecoder(IMAGENET, CPU, jpeg_device=CPU, max_pixels=128 * 127)
    decoded = decoder.decode([read("hopper.jpg")])
    assert decoded.errors[0].reason == "bomb" and decoded.inputs.shape == (0, 3, 96, 96)


def _without_exif(data: bytes) -> bytes:
    """The same JPEG with its EXIF block (and so its orientation) dropped."""
    image = Image.open(io.BytesIO(data))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def _without_segment(data: bytes, marker: int) -> bytes:
    """The JPEG with every segment of one kind (0xDB: quantisation tables) left out."""
    kept, position = bytearray(data[:2]), 2
    while data[position + 1] != 0xDA:  # up to the start of scan, then the rest as it is
        length = int.from_bytes(data[position + 2 : position + 4], "big")
        if data[position + 1] != marker:
            kept += data[position : position + 2 + length]
        position += 2 + length
    return bytes(kept + data[position:])


def decode_reason(data: bytes) -> str:
    with pytest.raises(ImageError) as caught:
        decode(data, IMAGENET)
    return caught.value.reason
