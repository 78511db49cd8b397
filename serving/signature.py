"""One signature of a loaded SavedModel: its SignatureDef, input checks and the model call.

Inputs arrive as numpy arrays (from JSON or from TensorProtos); this module checks
names, dtypes, ranks, batch sizes and the server's limits, then calls the concrete
function. Any failure is a `ServingError` with TF Serving's code.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import tensorflow as tf
from PIL import Image
from tensorflow.core.framework import types_pb2
from tensorflow.core.protobuf import meta_graph_pb2

from serving.batching import task_size_error
from serving.errors import ServingError, code_name, first_line, invalid_argument


_MAGIC = ((b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"),
          (b"BM", "BMP"))
# PNG and JPEG images up to this many pixels are decoded by Pillow before they join a batch (about
# 25 us for a digit), so a corrupt one is refused on its own instead of failing a model call for its
# batch-mates. No TensorFlow here: measured, even a small TensorFlow call beside the model's doubled
# the p99 of the requests in it (docs/performance.md). Pillow decodes PNG with zlib and JPEG with
# libjpeg(-turbo), as TensorFlow's decoders do; larger images (decoding twice would double their
# cost) and GIF/BMP (decoders that differ) are left to the batch's isolation (serving/batching.py).
DECODE_CHECK_MAX_PIXELS = 1 << 20
_DECODE_CHECKED = ("PNG", "JPEG")


@dataclass(frozen=True)
class Limits:
    max_instances: int
    max_image_bytes: int
    max_image_pixels: int
    max_request_pixels: int
    image_input: str  # string inputs with this name must be encoded images within the limits above
    batch_limit: int | None = None  # with batching on: the most examples a request of a batched signature may have


@dataclass(frozen=True)
class TensorSpec:
    dtype: int  # types_pb2 enum, e.g. DT_STRING
    shape: tuple[int, ...] | None  # -1 for unknown dimensions; None for unknown rank

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype(object) if self.dtype == types_pb2.DT_STRING else tf.dtypes.as_dtype(self.dtype).as_numpy_dtype

    @property
    def dtype_name(self) -> str:
        return types_pb2.DataType.Name(self.dtype)

    @property
    def batched(self) -> bool:
        return bool(self.shape) and self.shape[0] == -1


def _spec(info: meta_graph_pb2.TensorInfo) -> TensorSpec:
    if info.tensor_shape.unknown_rank:
        return TensorSpec(info.dtype, None)
    return TensorSpec(info.dtype, tuple(int(dim.size) for dim in info.tensor_shape.dim))


class Signature:
    def __init__(self, name: str, proto: meta_graph_pb2.SignatureDef,
                 function: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]], limits: Limits):
        """`function` runs the model: input arrays by alias in, output arrays by alias out."""
        self.name = name
        self.proto = proto
        self.inputs = {alias: _spec(info) for alias, info in sorted(proto.inputs.items())}
        self.outputs = {alias: _spec(info) for alias, info in sorted(proto.outputs.items())}
        self._function = function
        self._limits = limits

    @property
    def batchable(self) -> bool:
        """Whether requests can be concatenated: every input and output has a batch dimension."""
        return all(spec.batched for spec in [*self.inputs.values(), *self.outputs.values()])

    def check(self, inputs: dict[str, np.ndarray]) -> int:
        """Validates a request's inputs in place of the model; returns its batch size."""
        size = self.check_shapes({alias: (_dtype_name(value), value.shape) for alias, value in inputs.items()})
        image = inputs.get(self._limits.image_input)
        if image is not None and self.inputs[self._limits.image_input].dtype == types_pb2.DT_STRING:
            pixels = sum(self._check_image(index, data) for index, data in enumerate(image.reshape(-1)))
            if pixels > self._limits.max_request_pixels:
                # Each image may be within its limit and the batch still too big to decode at once.
                raise invalid_argument(f"the request's images have {pixels} pixels in all; the limit is "
                                       f"{self._limits.max_request_pixels} pixels per request (send fewer or "
                                       f"smaller images per request)")
        return size

    def check_shapes(self, shapes: dict[str, tuple[str, tuple[int, ...]]]) -> int:
        """Validates input names, dtypes and shapes ({alias: (DT_... name, shape)}); returns the batch size.

        Needs no values, so a gRPC request's claimed shapes are checked before anything is
        allocated for them.
        """
        missing = sorted(set(self.inputs) - set(shapes))
        unknown = sorted(set(shapes) - set(self.inputs))
        if unknown:
            raise invalid_argument(f"input tensor alias not found in signature: {unknown[0]}. "
                                   f"Inputs expected to be in the set {{{','.join(self.inputs)}}}.")
        if missing:
            sent = ",".join(sorted(shapes))
            raise invalid_argument(f"input size does not match signature: {len(shapes)}!={len(self.inputs)} "
                                   f"len({{{sent}}}) != len({{{','.join(self.inputs)}}}). Sent extra: {{}}. "
                                   f"Missing but required: {{{','.join(missing)}}}.")
        sizes = set()
        for alias, (dtype_name, shape) in shapes.items():
            spec = self.inputs[alias]
            shape = tuple(shape)
            if dtype_name != spec.dtype_name:  # else tf.constant fails inside the model call
                raise invalid_argument(f"input {alias} expects {spec.dtype_name} but {dtype_name} is provided")
            if spec.shape is not None and len(shape) != len(spec.shape):
                raise invalid_argument(f"input {alias} must have rank {len(spec.shape)} "
                                       f"(shape {list(spec.shape)}), got shape {list(shape)}")
            if spec.shape is not None:
                for position, (want, got) in enumerate(zip(spec.shape, shape)):
                    if want != -1 and want != got:
                        raise invalid_argument(f"input {alias} dimension {position} must be {want}, got {got}")
            if spec.batched:
                sizes.add(shape[0])
        if len(sizes) > 1:
            raise invalid_argument(f"inputs have different batch sizes: {sorted(sizes)}")
        size = sizes.pop() if sizes else 1
        if size == 0:
            raise invalid_argument("the request has no examples: send at least one instance")
        if self._limits.batch_limit is not None and self.batchable and size > self._limits.batch_limit:
            raise task_size_error(size, self._limits.batch_limit)  # TF Serving's words, before any image is read
        if size > self._limits.max_instances:
            raise invalid_argument(f"the request has {size} examples; the limit is {self._limits.max_instances} "
                                   f"per request (send several requests)")
        return size

    def max_elements(self, alias: str) -> int | None:
        """The most values `alias` can hold in a request that passes `check_shapes` (None: unbounded)."""
        spec = self.inputs.get(alias)
        if spec is None or spec.shape is None or any(dim < 0 for dim in spec.shape[1:]):
            return None
        limit = self._limits.max_instances
        if self._limits.batch_limit is not None and self.batchable:
            limit = min(limit, self._limits.batch_limit)
        fixed = math.prod(spec.shape[1:]) if spec.batched else math.prod(spec.shape)
        return limit * fixed if spec.batched else fixed

    def undecodable(self, inputs: dict[str, np.ndarray]) -> ServingError | None:
        """The error the model gives these images, found by decoding them only (None: they decode).

        For isolating a bad request in a failed batch: the same TensorFlow op as the model's
        preprocessing decides, at a fraction of a model call. None too when the signature has no
        image input (the batcher then halves the batch instead).
        """
        image = inputs.get(self._limits.image_input)
        if image is None or self.inputs[self._limits.image_input].dtype != types_pb2.DT_STRING:
            return None
        return _decode_error(image.reshape(-1))

    def _check_image(self, index: int, data) -> int:
        """Checks one encoded image from its header; returns its pixel count."""
        if not isinstance(data, bytes):
            raise invalid_argument(f"{self._limits.image_input}[{index}] must be bytes (JSON: {{\"b64\": ...}})")
        if len(data) > self._limits.max_image_bytes:
            raise invalid_argument(f"{self._limits.image_input}[{index}] is {len(data)} bytes; "
                                   f"the limit is {self._limits.max_image_bytes} bytes per image")
        try:
            with Image.open(io.BytesIO(data)) as image:  # reads the header only
                width, height, kind = image.width, image.height, image.format
        except Image.DecompressionBombError:  # the header claims over twice Pillow's MAX_IMAGE_PIXELS
            raise invalid_argument(f"{self._limits.image_input}[{index}] has more than "
                                   f"{2 * Image.MAX_IMAGE_PIXELS} pixels; the limit is "
                                   f"{self._limits.max_image_pixels} pixels per image") from None
        except Exception:  # Pillow raises many types for data that is not an image
            kind = next((kind for magic, kind in _MAGIC if data.startswith(magic)), None)
            if kind is not None:  # the right signature, but the header is cut short or broken
                raise invalid_argument(f"{self._limits.image_input}[{index}] is a truncated or corrupt {kind} image "
                                       f"({len(data)} bytes)") from None
            raise invalid_argument(f"{self._limits.image_input}[{index}] is not a PNG, JPEG, GIF or BMP image "
                                   f"({len(data)} bytes)") from None
        if kind not in ("PNG", "JPEG", "GIF", "BMP"):
            raise invalid_argument(f"{self._limits.image_input}[{index}] is a {kind} image; "
                                   f"send PNG, JPEG, GIF or BMP")
        if width * height > self._limits.max_image_pixels:
            raise invalid_argument(f"{self._limits.image_input}[{index}] is {width}x{height} pixels; "
                                   f"the limit is {self._limits.max_image_pixels} pixels per image")
        if kind in _DECODE_CHECKED and width * height <= DECODE_CHECK_MAX_PIXELS:
            try:
                with Image.open(io.BytesIO(data)) as image:
                    image.load()
            except Exception as error:  # Pillow raises many types for broken data
                raise invalid_argument(f"{self._limits.image_input}[{index}] is a corrupt {kind} image that "
                                       f"cannot be decoded ({first_line(error, type(error).__name__)})") from None
        return width * height

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Calls the model. Checked inputs only (see `check`); bad content still gives INVALID_ARGUMENT."""
        try:
            return self._function(inputs)
        except tf.errors.InvalidArgumentError as error:
            raise invalid_argument(_op_message(error.message)) from None
        except tf.errors.OpError as error:
            raise ServingError(code_name(error.error_code), _op_message(error.message)) from None


def _decode_error(images: np.ndarray) -> ServingError | None:
    try:
        _decode_all(tf.constant(images, dtype=tf.string))
    except tf.errors.InvalidArgumentError as error:
        return invalid_argument(_op_message(error.message))
    return None


@tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
def _decode_all(images: tf.Tensor) -> tf.Tensor:
    """Decodes each encoded image as the model's preprocessing does (decode_image), keeping only shapes."""
    return tf.map_fn(lambda data: tf.shape(tf.io.decode_image(data, expand_animations=False)), images,
                     fn_output_signature=tf.TensorSpec([3], tf.int32))


def _dtype_name(value: np.ndarray) -> str:
    """The TF dtype of an input array: object arrays hold strings (bytes)."""
    if value.dtype == object or value.dtype.kind in "SU":
        return "DT_STRING"
    try:
        return types_pb2.DataType.Name(tf.dtypes.as_dtype(value.dtype).as_datatype_enum)
    except TypeError:
        return str(value.dtype)


def _op_message(message: str) -> str:
    """The failing op's own words from a TF error, e.g. "Invalid PNG data, size 317".

    A concrete function's error reads "Graph execution error:", "Detected at node ...", the
    stack, then the op's message and "[[{{node ...}}]] [Op:...]": the line before the node
    marker is the one that says what was wrong with the input.
    """
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    for index, line in enumerate(lines):
        if line.startswith("[[{{node") and index > 0:
            return lines[index - 1]
    lines = [line for line in lines if line != "Graph execution error:"]
    return re.sub(r"\s*\[Op:[^\]]*\]$", "", lines[0]) if lines else "invalid input"
