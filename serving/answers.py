"""A digits model's answer, decoded once for REST and gRPC (KServe's `InferResponse.from_rest/from_grpc`).

Every client of the model server (`serving/client.py`, the web app's `web/model_server.py`, batch
predictions) reads the same outputs of the same signatures; this module turns TF Serving's REST rows
and gRPC TensorProtos into `Answer`s and checks that they are a digits model's. Outputs a model
exported before they existed (the ink fraction, the abstention decision) are None, never guessed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from data import contract


class BadAnswer(ValueError):
    """The server's answer is not a digits model's (missing outputs, wrong shapes, NaN)."""


@dataclass(frozen=True)
class Answer:
    digit: int  # the most probable class
    confidence: float  # the model's probability of `digit` (uncalibrated)
    probabilities: tuple[float, ...]
    ink_fraction: float | None = None  # None from models older than the ink_fraction output
    normalized_image: tuple[tuple[float, ...], ...] | None = None  # 28x28 in [0, 1], normalized_image signature
    decision: str | None = None  # one of contract.DECISIONS; None from models without abstention outputs
    calibrated_confidence: float | None = None  # temperature-scaled probability of `digit`
    ood_score: float | None = None  # the energy of the logits: large where the image is like no digit
    model_version: int | None = None  # when the transport says which version answered

    @property
    def blank(self) -> bool:
        """The model found no ink in the image (a blank canvas, a uniform photo)."""
        return self.ink_fraction is not None and self.ink_fraction <= 0.0

    @property
    def accepted(self) -> bool | None:
        """The model stands by `digit` without a person looking; None if the model does not say."""
        return None if self.decision is None else self.decision == "accepted"

    @property
    def runner_up(self) -> int:
        """The second most probable class: the other reading of an unsure digit."""
        order = sorted(range(len(self.probabilities)), key=self.probabilities.__getitem__, reverse=True)
        return order[1]

    def describe(self) -> str:
        """One line for a person: "7 (0.991)", "not a digit", "unsure: 3 or 8 (0.52 / 0.41)"."""
        if self.blank:
            return "no digit: no ink found"
        if self.decision == "not_a_digit":
            return "not a digit"
        if self.decision == "unsure":
            other = self.runner_up
            return (f"unsure: {self.digit} or {other} "
                    f"({self.probabilities[self.digit]:.2f} / {self.probabilities[other]:.2f})")
        return f"{self.digit} ({self.confidence:.3f})"


def from_rest(rows: Sequence[Mapping], with_image: bool = False, model_version: int | None = None) -> list[Answer]:
    """Answers from a REST predict's `predictions` (row format)."""
    if not isinstance(rows, Sequence) or not all(isinstance(row, Mapping) for row in rows):
        raise BadAnswer("the answer's predictions are not a list of objects")
    answers = []
    for row in rows:
        if contract.PROBABILITIES_OUTPUT not in row:
            raise BadAnswer(f"the answer has no {contract.PROBABILITIES_OUTPUT!r}: is it a digits model?")
        if with_image and contract.NORMALIZED_IMAGE_OUTPUT not in row:
            raise BadAnswer(f"the answer has no {contract.NORMALIZED_IMAGE_OUTPUT!r} (is the model exported with the "
                            f"{contract.NORMALIZED_SIGNATURE} signature?)")
        answers.append(_answer(
            row[contract.PROBABILITIES_OUTPUT], row.get(contract.INK_FRACTION_OUTPUT),
            row.get(contract.NORMALIZED_IMAGE_OUTPUT) if with_image else None, row.get(contract.DECISION_OUTPUT),
            row.get(contract.CONFIDENCE_OUTPUT), row.get(contract.OOD_SCORE_OUTPUT), model_version))
    return answers


def from_grpc(outputs: Mapping, with_image: bool = False, model_version: int | None = None) -> list[Answer]:
    """Answers from a gRPC PredictResponse's `outputs` (TensorProtos by alias)."""
    if contract.PROBABILITIES_OUTPUT not in outputs:
        raise BadAnswer(f"the answer has no {contract.PROBABILITIES_OUTPUT!r}: is it a digits model?")
    if with_image and contract.NORMALIZED_IMAGE_OUTPUT not in outputs:
        raise BadAnswer(f"the answer has no {contract.NORMALIZED_IMAGE_OUTPUT!r}")
    columns = {alias: tensor_values(outputs[alias]) if alias in outputs else None
               for alias in (contract.PROBABILITIES_OUTPUT, contract.INK_FRACTION_OUTPUT, contract.DECISION_OUTPUT,
                             contract.CONFIDENCE_OUTPUT, contract.OOD_SCORE_OUTPUT)}
    images = tensor_values(outputs[contract.NORMALIZED_IMAGE_OUTPUT]) if with_image else None
    probabilities = columns[contract.PROBABILITIES_OUTPUT]
    if probabilities.ndim != 2:
        raise BadAnswer(f"probabilities of shape {list(probabilities.shape)}; expected [N, {contract.NUM_CLASSES}]")
    count = probabilities.shape[0]
    for alias, column in [*columns.items(), (contract.NORMALIZED_IMAGE_OUTPUT, images)]:
        if column is not None and (column.ndim == 0 or column.shape[0] != count):
            raise BadAnswer(f"{alias} has {0 if column.ndim == 0 else column.shape[0]} rows, probabilities {count}")

    def cell(alias: str, index: int):
        column = columns[alias]
        return None if column is None else column[index]

    return [_answer(probabilities[index], cell(contract.INK_FRACTION_OUTPUT, index),
                    None if images is None else images[index], cell(contract.DECISION_OUTPUT, index),
                    cell(contract.CONFIDENCE_OUTPUT, index), cell(contract.OOD_SCORE_OUTPUT, index), model_version)
            for index in range(count)]


def _answer(probabilities, ink, image, decision, calibrated, ood, model_version) -> Answer:
    try:
        row = tuple(float(value) for value in probabilities)
        ink = None if ink is None else float(ink)
        picture = None if image is None else tuple(tuple(float(value) for value in line) for line in image)
        calibrated = None if calibrated is None else float(calibrated)
        ood = None if ood is None else float(ood)
        code = None if decision is None else int(decision)
    except (TypeError, ValueError) as error:
        raise BadAnswer(f"the answer is not a digits model's: {error}") from None
    if len(row) != contract.NUM_CLASSES:
        raise BadAnswer(f"the answer has {len(row)} probabilities; expected {contract.NUM_CLASSES}")
    size = contract.NORMALIZED_IMAGE_SIZE
    if picture is not None and (len(picture) != size or any(len(line) != size for line in picture)):
        raise BadAnswer(f"the answer's normalised image is not {size}x{size}")
    numbers = [*row, *(value for value in (ink, calibrated) if value is not None),
               *(value for line in picture or () for value in line)]
    if not all(math.isfinite(value) for value in numbers):
        raise BadAnswer("the answer has values that are not numbers (NaN or infinity): is the model broken?")
    if code is not None and not 0 <= code < len(contract.DECISIONS):
        raise BadAnswer(f"the answer's decision {code} is none of {list(contract.DECISIONS)}")
    digit = max(range(len(row)), key=row.__getitem__)
    return Answer(digit, row[digit], row, ink, picture, None if code is None else contract.DECISIONS[code],
                  calibrated, ood, model_version)


def tensor_values(tensor):
    """A float32, int64 or bool TensorProto as a numpy array of its shape (TF Serving fills
    tensor_content; other servers the typed value fields)."""
    import numpy as np
    from tensorflow.core.framework import types_pb2

    kinds = {types_pb2.DT_FLOAT: (np.float32, "float_val"), types_pb2.DT_INT64: (np.int64, "int64_val"),
             types_pb2.DT_BOOL: (np.bool_, "bool_val"), types_pb2.DT_INT32: (np.int32, "int_val")}
    if tensor.dtype not in kinds:
        raise BadAnswer(f"an output of type {types_pb2.DataType.Name(tensor.dtype)}, not a number")
    dtype, field = kinds[tensor.dtype]
    shape = [dim.size for dim in tensor.tensor_shape.dim]
    values = (np.frombuffer(tensor.tensor_content, dtype=dtype) if tensor.tensor_content
              else np.array(getattr(tensor, field), dtype=dtype))
    size = int(np.prod(shape)) if shape else 1
    if values.size == 1 and size > 1:  # TF Serving may send a repeated value once
        values = np.repeat(values, size)
    if values.size != size:
        raise BadAnswer(f"an output holds {values.size} values for the shape {shape}")
    return values.reshape(shape)
