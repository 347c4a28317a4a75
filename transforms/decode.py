"""Decode and resize: URI -> compact uint8 RGB pixels at the model's input size.

`decode_image` is the single definition of the preprocessing; the DoFn, the stand-in calibration,
the tests and the benchmarks all call it, so "the same preprocessed pixels" means the same code.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import io
from typing import Union

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.utils.windowed_value import WindowedValue

from transforms.records import FAILED, TRANSIENT_ERRORS, DecodedImage, Failure, ImageRef, Stage, describe_exception
from transforms.uri_reader import ReadConfig, ReadError, read_uri

SUPPORTED_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF")
RESIZE_MODES = ("stretch", "center_crop")


@dataclasses.dataclass(frozen=True)
class PreprocessConfig:
    """How bytes become pixels. Recorded in the Parquet metadata, so every field is part of the result."""

    image_size: int
    resize_mode: str = "stretch"
    max_pixels: int = 100_000_000
    allow_truncated: bool = False
    background: tuple = (255, 255, 255)

    def describe(self) -> str:
        return (
            f"decode(first frame, EXIF orientation applied, alpha over rgb{self.background}, "
            f"max {self.max_pixels} px, truncated {'accepted' if self.allow_truncated else 'rejected'}) "
            f"-> RGB uint8 -> {self.resize_mode} to {self.image_size}x{self.image_size} "
            f"(PIL bicubic, antialiased; JPEG DCT-scaled first) -> float32 / 255 in [0, 1]"
        )


class ImageDecodeError(ValueError):
    """The bytes are not an image this pipeline can embed; the message says why."""


def decode_image(data: bytes, config: PreprocessConfig) -> np.ndarray:
    """Decodes image bytes into uint8 [size, size, 3] RGB.

    Pixel count is checked from the header before any pixel is allocated (decompression bombs).
    """
    from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

    if not data:
        raise ImageDecodeError("The file is empty (0 bytes).")
    Image.init()  # registers every plugin (WEBP, TIFF); a no-op after the first call
    # Our limit, checked from the header below, replaces PIL's process-wide one, which would warn or
    # raise at a fixed 89 / 179 megapixels whatever --max_image_pixels says.
    Image.MAX_IMAGE_PIXELS = None
    try:
        image = Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS)
    except UnidentifiedImageError:
        raise ImageDecodeError(
            f"Not a supported image (supported: {', '.join(SUPPORTED_FORMATS)}); it starts with {data[:12]!r}."
        ) from None
    with image:
        width, height = image.size
        if width * height > config.max_pixels:
            raise ImageDecodeError(
                f"The image declares {width}x{height} = {width * height} pixels, over the "
                f"{config.max_pixels}-pixel limit (--max_image_pixels)."
            )
        if width < 1 or height < 1:
            raise ImageDecodeError(f"The image declares an empty size {width}x{height}.")
        if image.format in ("JPEG", "MPO"):
            # Decode straight to the smallest DCT scale still at least the target size in both sides.
            image.draft(image.mode, (config.image_size, config.image_size))
        previous_truncated_setting = ImageFile.LOAD_TRUNCATED_IMAGES
        ImageFile.LOAD_TRUNCATED_IMAGES = config.allow_truncated
        try:
            image.load()
        except OSError as exc:
            raise ImageDecodeError(f"The image data is corrupt or truncated ({' '.join(str(exc).split())}).") from None
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = previous_truncated_setting
        upright = ImageOps.exif_transpose(image)
        rgb = _to_rgb(upright, config.background)
        if config.resize_mode == "center_crop":
            resized = ImageOps.fit(rgb, (config.image_size,) * 2, method=Image.Resampling.BICUBIC)
        else:
            resized = rgb.resize((config.image_size,) * 2, Image.Resampling.BICUBIC)
        return np.asarray(resized, dtype=np.uint8)


def _to_rgb(image, background: tuple):
    """Any PIL mode -> 8-bit RGB: 16-bit scaled (not clipped), alpha composited over `background`."""
    from PIL import Image

    if image.mode.startswith("I"):  # 16/32-bit integer greyscale; PIL's convert("L") would clip
        values = np.asarray(image).astype(np.float64)
        scale = 255.0 / (65535.0 if values.max(initial=0) > 255 or image.mode.startswith("I;16") else 255.0)
        image = Image.fromarray(np.clip(values * scale + 0.5, 0, 255).astype(np.uint8), "L")
    elif image.mode == "F":
        image = Image.fromarray(np.clip(np.asarray(image) * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def read_and_decode(ref: ImageRef, preprocess: PreprocessConfig, read: ReadConfig) -> Union[DecodedImage, Failure]:
    """One input's pixels, or the Failure that says why not. Transient errors propagate (the runner retries)."""
    try:
        data = ref.data if ref.data is not None else read_uri(ref.uri, read)
    except ReadError as exc:
        return Failure(ref.id, ref.uri, Stage.READ, str(exc))
    try:
        return DecodedImage(ref.id, ref.uri, decode_image(data, preprocess))
    except ImageDecodeError as exc:
        return Failure(ref.id, ref.uri, Stage.DECODE, str(exc))
    except TRANSIENT_ERRORS:
        raise
    except Exception as exc:  # corrupt files make PIL raise many types; each is this input's fault
        return Failure(ref.id, ref.uri, Stage.DECODE, f"The image could not be decoded ({describe_exception(exc)}).")


class DecodeImagesFn(beam.DoFn):
    """ImageRef -> DecodedImage; unreadable or undecodable inputs go to the FAILED output.

    Decoding runs ahead on a small thread pool (PIL releases the GIL) while the fused downstream
    inference computes, so decode and model overlap even in one process. At most `prefetch` images
    are in flight; results are emitted in input order.
    """

    def __init__(self, preprocess: PreprocessConfig, read: ReadConfig, threads: int = 1, prefetch: int = 64):
        self._preprocess = preprocess
        self._read = read
        self._threads = threads
        self._prefetch = prefetch
        self._counters = {
            "decoded": Metrics.counter("embeddings", "decoded"),
            Stage.READ: Metrics.counter("embeddings", "read_errors"),
            Stage.DECODE: Metrics.counter("embeddings", "decode_errors"),
        }

    def setup(self):
        self._pool = concurrent.futures.ThreadPoolExecutor(self._threads, thread_name_prefix="decode")

    def start_bundle(self):
        self._in_flight = collections.deque()

    def process(self, ref: ImageRef, window=beam.DoFn.WindowParam, timestamp=beam.DoFn.TimestampParam):
        self._in_flight.append((self._pool.submit(read_and_decode, ref, self._preprocess, self._read), window, timestamp))
        while len(self._in_flight) > self._prefetch or (self._in_flight and self._in_flight[0][0].done()):
            future, _, _ = self._in_flight.popleft()
            yield self._output(future.result())

    def finish_bundle(self):
        while self._in_flight:
            future, window, timestamp = self._in_flight.popleft()
            output = self._output(future.result())
            if isinstance(output, beam.pvalue.TaggedOutput):
                yield beam.pvalue.TaggedOutput(output.tag, WindowedValue(output.value, timestamp, [window]))
            else:
                yield WindowedValue(output, timestamp, [window])

    def teardown(self):
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _output(self, result: Union[DecodedImage, Failure]):
        # Counted here, in the bundle's thread: Beam metrics are not recorded from pool threads.
        if isinstance(result, Failure):
            self._counters[result.stage].inc()
            return beam.pvalue.TaggedOutput(FAILED, result)
        self._counters["decoded"].inc()
        return result


class DecodeImages(beam.PTransform):
    """PCollection[ImageRef] -> {main: DecodedImage, FAILED: Failure}."""

    def __init__(self, preprocess: PreprocessConfig, read: ReadConfig = ReadConfig(), threads: int = 1):
        super().__init__()
        self._fn = DecodeImagesFn(preprocess, read, threads)

    def expand(self, refs):
        return refs | "DecodeAndResize" >> beam.ParDo(self._fn).with_outputs(FAILED, main="decoded")
