"""A batch of image bytes to model input on the model's device: JPEGs on the GPU where there is one.

At 3,000 images/s a GPU worker has about 5 ms of CPU per image for everything
but the model, and decoding with Pillow is most of it. nvJPEG (torchvision's
`decode_jpeg` given a list and a CUDA device) decodes a whole batch on the
GPU, where the model's input is then resized and normalised too, so that
only the compressed bytes cross to the device.

The checks stay on the CPU and come first, as on the CPU path: every body is
opened header-only with the format allow-list and the pixel cap
(`enrichment.media.decode.open_image`). Only JPEGs in RGB or greyscale go to
the GPU decoder (with their EXIF orientation applied, as `exif_transpose`
does); every other image, and the JPEGs of a batch the GPU decoder refuses,
take the CPU path (`enrichment.media.decode.decode`), so a broken file gets the
same error reason either way. Without CUDA the CPU path is all there is. The
two paths agree within the decode tolerance of `benchmarks/bench_decode.py`
(mean absolute difference in 0..255 pixel units), tested on the CPU by running
the GPU path's code with the CPU as its device.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.io import ImageReadMode, decode_jpeg

from enrichment.media.decode import (
    DEFAULT_MAX_PIXELS,
    ImageError,
    Preprocessing,
    decode,
    open_image,
)

TENSOR_MODES = ("RGB", "L")  # JPEG modes the tensor decoder turns into RGB as Pillow does
JPEG_END = b"\xff\xd9"  # the end-of-image marker


@dataclass
class DecodedBatch:
    """Model inputs for the bodies that decoded, in their order, and why the others did not.

    `inputs` has one row per body not in `errors` (float32, (n, 3, size, size), on
    the decoder's device); `errors` maps a body's position to its ImageError.
    """

    inputs: torch.Tensor
    errors: dict[int, ImageError]


class BatchDecoder:
    """Decodes batches of image bytes to normalised model input on `device`.

    `jpeg_device` is where JPEGs are decoded by torchvision (`decode_jpeg`): the
    GPU by default where `device` is one; None sends every image through the
    CPU path. The CPU as `jpeg_device` runs the GPU path's code without a GPU
    (for its tests); on a CPU-only worker the CPU path is faster, since Pillow
    decodes large JPEGs at a reduced DCT scale.
    """

    def __init__(
        self,
        preprocessing: Preprocessing,
        device: torch.device,
        jpeg_device: torch.device | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.preprocessing = preprocessing
        self.device = device
        self.jpeg_device = jpeg_device
        self.max_pixels = max_pixels
        shape = (1, 3, 1, 1)
        mean = torch.tensor(preprocessing.mean, dtype=torch.float32).view(shape)
        std = torch.tensor(preprocessing.std, dtype=torch.float32).view(shape)
        self._mean = mean.to(device)
        self._std = std.to(device)

    @classmethod
    def for_device(
        cls,
        preprocessing: Preprocessing,
        device: torch.device,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> BatchDecoder:
        """JPEGs on the GPU where `device` is a CUDA device, the CPU path everywhere else."""
        jpeg_device = device if device.type == "cuda" else None
        return cls(preprocessing, device, jpeg_device, max_pixels)

    @property
    def on_gpu(self) -> bool:
        return self.jpeg_device is not None and self.jpeg_device.type == "cuda"

    def decode(self, bodies: Sequence[bytes]) -> DecodedBatch:
        """Every body to a row of model input, or to the ImageError it raises on the CPU path."""
        rows: dict[int, torch.Tensor] = {}
        errors: dict[int, ImageError] = {}
        on_tensors: list[int] = []
        for position, body in enumerate(bodies):
            try:
                image = open_image(body, self.max_pixels)
            except ImageError as error:
                errors[position] = error
                continue
            if self._tensor_decodable(image.format, image.mode, body):
                on_tensors.append(position)
                continue
            self._on_cpu(position, body, rows, errors)
        if on_tensors:
            self._on_jpeg_device(bodies, on_tensors, rows, errors)
        size = self.preprocessing.input_size
        ordered = [rows[position] for position in sorted(rows)]
        if ordered:
            inputs = torch.stack(ordered)
        else:
            inputs = torch.empty((0, 3, size, size), dtype=torch.float32, device=self.device)
        return DecodedBatch(inputs, errors)

    def _tensor_decodable(self, fmt: str | None, mode: str, body: bytes) -> bool:
        """A JPEG the tensor decoder reads as Pillow would, and whole.

        A JPEG cut short decodes there to grey-filled pixels without a word, where
        Pillow says `truncated`: one that does not end in its end-of-image marker
        (trailing zeros aside) goes to the CPU path, which finds out which it is.
        """
        return (
            self.jpeg_device is not None
            and fmt == "JPEG"
            and mode in TENSOR_MODES
            and body.rstrip(b"\0").endswith(JPEG_END)
        )

    def _on_cpu(
        self,
        position: int,
        body: bytes,
        rows: dict[int, torch.Tensor],
        errors: dict[int, ImageError],
    ) -> None:
        try:
            array = decode(body, self.preprocessing, self.max_pixels)
        except ImageError as error:
            errors[position] = error
            return
        rows[position] = torch.from_numpy(array).to(self.device, non_blocking=True)

    def _on_jpeg_device(
        self,
        bodies: Sequence[bytes],
        positions: list[int],
        rows: dict[int, torch.Tensor],
        errors: dict[int, ImageError],
    ) -> None:
        """Decode the JPEGs at `positions` together; a batch the decoder refuses goes to the CPU."""
        assert self.jpeg_device is not None
        encoded = [
            torch.from_numpy(np.frombuffer(bytearray(bodies[position]), dtype=np.uint8))
            for position in positions
        ]
        try:
            with warnings.catch_warnings():
                # torchvision 0.29 warns on every call that its decoders move to TorchCodec
                # (not installed); the batched nvJPEG decode is there in the pinned release.
                warnings.filterwarnings("ignore", category=DeprecationWarning)
                images = decode_jpeg(
                    encoded,
                    mode=ImageReadMode.RGB,
                    device=self.jpeg_device,
                    apply_exif_orientation=True,
                )
        except Exception:  # one broken JPEG fails the call: each gets its CPU-path reason
            for position in positions:
                self._on_cpu(position, bodies[position], rows, errors)
            return
        for position, image in zip(positions, images, strict=True):
            rows[position] = self._to_input(image)

    def _to_input(self, image: torch.Tensor) -> torch.Tensor:
        """A (3, H, W) uint8 image to a normalised (3, size, size) float32 row on `device`."""
        size = self.preprocessing.input_size
        pixels = image.to(self.device, non_blocking=True).unsqueeze(0).float()
        # Antialiased bilinear, as Pillow's BILINEAR resize is when it shrinks.
        resized = F.interpolate(
            pixels, size=(size, size), mode="bilinear", antialias=True, align_corners=False
        )
        return ((resized.clamp(0, 255) / 255.0 - self._mean) / self._std)[0]
