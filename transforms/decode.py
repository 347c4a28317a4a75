"""Decode and resize: URI -> compact uint8 RGB pixels at the model's input size.

`decode_image` is the single definition of the preprocessing; the DoFn, the stand-in calibration,
the tests and the benchmarks all call it, so "the same preprocessed pixels" means the same code.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import io
import threading
from typing import Callable, Iterator, Optional, Union

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.utils.windowed_value import WindowedValue

from transforms.records import FAILED, DecodedImage, Failure, ImageRef, Stage, describe_exception, retry_out_of_memory
from transforms.uri_reader import ReadConfig, ReadError, read_uri, settled_version

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


TRUNCATED_HINT = " Pass --allow_truncated_images to embed it with the missing part grey."


class ImageDecodeError(ValueError):
    """The bytes are not an image this pipeline can embed; the message says why."""


class _PerThreadFlag:
    """Replaces PIL's process-wide `ImageFile.LOAD_TRUNCATED_IMAGES` with a value per thread.

    Pillow only ever tests the flag's truth, so each decode thread can set its own without racing
    the others (Dataflow runs many bundle threads per process). Threads that never set it see the
    value the process had when this was installed.
    """

    def __init__(self, default):
        self._default = bool(default)
        self._local = threading.local()

    def __bool__(self) -> bool:
        return getattr(self._local, "value", self._default)

    def set(self, value: bool) -> None:
        self._local.value = value

    def reset(self) -> None:
        self._local.__dict__.pop("value", None)


_install_lock = threading.Lock()


def _truncation_flag() -> _PerThreadFlag:
    from PIL import ImageFile

    with _install_lock:
        if not isinstance(ImageFile.LOAD_TRUNCATED_IMAGES, _PerThreadFlag):
            ImageFile.LOAD_TRUNCATED_IMAGES = _PerThreadFlag(ImageFile.LOAD_TRUNCATED_IMAGES)
        return ImageFile.LOAD_TRUNCATED_IMAGES


# EXIF orientations that neither swap the axes nor change pixels when applied after the resize
# (flips and the half turn commute exactly with PIL's separable resampling to a square; measured).
_ORIENTATIONS_AFTER_RESIZE = {2: "FLIP_LEFT_RIGHT", 3: "ROTATE_180", 4: "FLIP_TOP_BOTTOM"}
_ORIENTATIONS_BEFORE_RESIZE = (5, 6, 7, 8)  # the transposes and quarter turns
_EXIF_ORIENTATION = 0x0112


@contextlib.contextmanager
def _opened(data: bytes, config: PreprocessConfig, draft_side: int) -> Iterator:
    """The first frame of the image in `data`, loaded, for the `with` block; ImageDecodeError when it is not a
    supported, sane image. The pixel count is checked from the header before any pixel is allocated
    (decompression bombs); JPEG decodes straight to the smallest DCT scale still `draft_side` in both sides."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise ImageDecodeError("The file is empty (0 bytes).")
    Image.init()  # registers every plugin (WEBP, TIFF); a no-op after the first call
    # Our limit, checked from the header below, replaces PIL's process-wide one, which would warn or
    # raise at a fixed 89 / 179 megapixels whatever --max_image_pixels says.
    Image.MAX_IMAGE_PIXELS = None
    truncation = _truncation_flag()
    try:
        image = Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS)
    except UnidentifiedImageError:
        raise ImageDecodeError(
            f"Not a supported image (supported: {', '.join(SUPPORTED_FORMATS)}); {describe_content(data)}."
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
            image.draft(image.mode, (draft_side, draft_side))
        truncation.set(config.allow_truncated)
        try:
            image.load()
        except OSError as exc:
            hint = "" if config.allow_truncated else TRUNCATED_HINT
            raise ImageDecodeError(
                f"The image data is corrupt or truncated ({' '.join(str(exc).split())}).{hint}"
            ) from None
        finally:
            truncation.reset()
        yield image


def decode_image(data: bytes, config: PreprocessConfig) -> np.ndarray:
    """Decodes image bytes into uint8 [size, size, 3] RGB: the preprocessing, as `config.describe()` says."""
    from PIL import Image, ImageOps

    with _opened(data, config, config.image_size) as image:
        orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
        late_transpose = None
        upright = image  # exif_transpose would copy an upright image whole (5% of decode time, measured)
        if orientation in _ORIENTATIONS_AFTER_RESIZE:
            late_transpose = getattr(Image.Transpose, _ORIENTATIONS_AFTER_RESIZE[orientation])
        elif orientation in _ORIENTATIONS_BEFORE_RESIZE:
            upright = ImageOps.exif_transpose(image)  # swaps axes: must precede the resize for the same pixels
        flat = to_rgb_or_grey(upright, config.background)
        if config.resize_mode == "center_crop":
            resized = ImageOps.fit(flat, (config.image_size,) * 2, method=Image.Resampling.BICUBIC)
        else:
            resized = flat.resize((config.image_size,) * 2, Image.Resampling.BICUBIC)
        if late_transpose is not None:
            resized = resized.transpose(late_transpose)
        return np.asarray(resized if resized.mode == "RGB" else resized.convert("RGB"), dtype=np.uint8)


def decode_thumbnail(data: bytes, side: int, config: PreprocessConfig):
    """The image as a person should see it (a PIL RGB image fitted into side x side, its aspect kept), opened
    and limited as `decode_image` opens images, with the same orientation and background."""
    from PIL import Image, ImageOps

    with _opened(data, config, side) as image:
        upright = to_rgb_or_grey(ImageOps.exif_transpose(image), config.background).convert("RGB")
    upright.thumbnail((side, side), Image.Resampling.BICUBIC)
    return upright


_SIGNATURES = ((b"%PDF", "a PDF document"), (b"PK\x03\x04", "a ZIP archive"), (b"\x1f\x8b", "gzip-compressed data"),
               (b"<?xml", "XML"), (b"\x00\x00\x00", "binary data of no known image format"))


def describe_content(data: bytes) -> str:
    """What the bytes look like, in words: an error row must not echo a file's content (a manifest could name
    any file a worker can read)."""
    size = f"{len(data):,} bytes"
    for signature, kind in _SIGNATURES:
        if data.startswith(signature):
            return f"it holds {kind} ({size})"
    head = data[:512]
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return f"it holds binary data of no known image format ({size})"
    lowered = text.lstrip().lower()
    if lowered.startswith(("<!doctype html", "<html")):
        return f"it holds an HTML page ({size}): a web server's error or login page?"
    if lowered.startswith(("{", "[")):
        return f"it holds JSON or other text ({size})"
    return f"it holds text, not an image ({size})"


_STRIP_ROWS = 256


def to_rgb_or_grey(image, background: tuple):
    """Any PIL mode -> 8-bit RGB, or 8-bit L for greyscale: 16/32-bit scaled (not clipped), alpha over `background`.

    Greyscale stays one channel through the resize (a third of the memory and work); the pixels equal
    those of resizing its RGB copy, because PIL resamples each channel alike.
    """
    from PIL import Image

    if image.mode.startswith("I") or image.mode == "F":
        image = Image.fromarray(_high_depth_to_uint8(image), "L")
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image if image.mode in ("RGB", "L") else image.convert("RGB")


def _high_depth_to_uint8(image) -> np.ndarray:
    """Integer greyscale (16 or 32 bit) as the 16-bit range 0..65535, float as 0..1, mapped to 0..255.

    A fixed range per mode keeps the mapping monotonic across images. Converted a strip of rows at a
    time, so memory stays near the image's own size instead of several float64 copies of it.
    """
    width, height = image.size
    out = np.empty((height, width), np.uint8)
    scale = np.float32(255.0 if image.mode == "F" else 255.0 / 65535.0)
    for top in range(0, height, _STRIP_ROWS):
        strip = np.asarray(image.crop((0, top, width, min(top + _STRIP_ROWS, height))))
        out[top:top + _STRIP_ROWS] = np.clip(np.rint(strip.astype(np.float32) * scale), 0, 255)
    return out


def _read_bytes(ref: ImageRef, read: ReadConfig) -> Union[bytes, Failure]:
    if ref.data is not None:
        return ref.data
    try:
        return read_uri(ref.uri, read)
    except ReadError as exc:
        return Failure(ref.id, ref.uri, Stage.READ, str(exc))
    except MemoryError:
        return Failure(ref.id, ref.uri, Stage.READ, "Ran out of memory reading this input.")
    except Exception as exc:  # the row boundary: whatever one uri makes a reader raise costs that row only
        return Failure(ref.id, ref.uri, Stage.READ, f"Could not read {ref.uri} ({describe_exception(exc)}).")


def decode_read_bytes(ref: ImageRef, data: bytes, preprocess: PreprocessConfig,
                      version: Callable[[], Optional[str]] = lambda: None) -> Union[DecodedImage, Failure]:
    """Decoded pixels or a decode Failure; an image that keeps exhausting memory is reported, not retried forever.

    A failure of the bytes themselves carries `version()`, the object's version (a memory failure does not)."""
    try:
        return retry_out_of_memory(
            lambda: DecodedImage(ref.id, ref.uri, decode_image(data, preprocess), hashlib.sha256(data).hexdigest()),
            ref, Stage.DECODE, "decoding")
    except ImageDecodeError as exc:
        return Failure(ref.id, ref.uri, Stage.DECODE, str(exc), version())
    except Exception as exc:  # corrupt files make PIL raise many types; each is this input's fault
        return Failure(ref.id, ref.uri, Stage.DECODE, f"The image could not be decoded ({describe_exception(exc)}).",
                       version())


class DecodeImagesFn(beam.DoFn):
    """ImageRef -> DecodedImage; unreadable or undecodable inputs go to the FAILED output.

    Reads run ahead on an I/O thread pool (downloads wait on the network, not the CPU) and decoding on
    `threads` CPU threads (PIL releases the GIL), while the fused downstream inference computes. At
    most `prefetch` inputs are in flight; results are emitted in input order, each in its own
    element's window and with its timestamp.
    """

    def __init__(
        self, preprocess: PreprocessConfig, read: ReadConfig, threads: int = 1, prefetch: int = 64, read_threads: int = 16
    ):
        self._preprocess = preprocess
        self._read = read
        self._threads = threads
        self._read_threads = read_threads
        self._prefetch = prefetch
        self._counters = {
            "decoded": Metrics.counter("embeddings", "decoded"),
            Stage.READ: Metrics.counter("embeddings", "read_errors"),
            Stage.DECODE: Metrics.counter("embeddings", "decode_errors"),
        }

    def setup(self):
        self._read_pool = concurrent.futures.ThreadPoolExecutor(self._read_threads, thread_name_prefix="read")
        self._decode_pool = concurrent.futures.ThreadPoolExecutor(self._threads, thread_name_prefix="decode")

    def start_bundle(self):
        self._in_flight = collections.deque()

    def _read_then_decode(self, ref: ImageRef) -> Union[DecodedImage, Failure]:
        data = _read_bytes(ref, self._read)
        if isinstance(data, Failure):
            return data
        # Stat'ed after the read, so an object rewritten in between is fresh and gets no version.
        version = (lambda: None) if ref.data is not None else (lambda: settled_version(ref.uri))
        return self._decode_pool.submit(decode_read_bytes, ref, data, self._preprocess, version).result()

    def process(self, ref: ImageRef, window=beam.DoFn.WindowParam, timestamp=beam.DoFn.TimestampParam):
        self._in_flight.append((self._read_pool.submit(self._read_then_decode, ref), window, timestamp))
        while len(self._in_flight) > self._prefetch or (self._in_flight and self._in_flight[0][0].done()):
            yield self._emit(*self._in_flight.popleft())

    def finish_bundle(self):
        while self._in_flight:
            yield self._emit(*self._in_flight.popleft())

    def teardown(self):
        for pool in (getattr(self, "_read_pool", None), getattr(self, "_decode_pool", None)):
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)

    def _emit(self, future, window, timestamp):
        result = future.result()
        # Counted here, in the bundle's thread: Beam metrics are not recorded from pool threads.
        if isinstance(result, Failure):
            self._counters[result.stage].inc()
            return beam.pvalue.TaggedOutput(FAILED, WindowedValue(result, timestamp, [window]))
        self._counters["decoded"].inc()
        return WindowedValue(result, timestamp, [window])


class DecodeImages(beam.PTransform):
    """PCollection[ImageRef] -> {main: DecodedImage, FAILED: Failure}."""

    def __init__(self, preprocess: PreprocessConfig, read: ReadConfig = ReadConfig(), threads: int = 1):
        super().__init__()
        self._fn = DecodeImagesFn(preprocess, read, threads)

    def expand(self, refs):
        return refs | "DecodeAndResize" >> beam.ParDo(self._fn).with_outputs(FAILED, main="decoded")
