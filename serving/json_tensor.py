"""TF Serving's JSON <-> tensor conventions for the REST predict API (its util/json_tensor.cc).

Row format: `{"instances": [...]}`, one entry per example, either a value (one input)
or an object of named inputs; answered with `{"predictions": [...]}`.
Columnar format: `{"inputs": value | {name: value}}`; answered with `{"outputs": ...}`.
Binary strings travel as `{"b64": "<standard base64>"}`.
"""

from __future__ import annotations

import base64
import binascii
import json
import re

import numpy as np
from tensorflow.core.framework import types_pb2

from serving.errors import invalid_argument
from serving.signature import Signature, TensorSpec

_BASE64 = re.compile(r"^[A-Za-z0-9+/]*={0,2}$")


def parse_predict_body(body: bytes) -> tuple[str, dict, bool]:
    """The request JSON -> (signature name, raw inputs by alias or None for 'the only input', row format?)."""
    if not body.strip():
        raise invalid_argument("JSON Parse error: The document is empty")
    try:
        document = json.loads(body)
    except UnicodeDecodeError:
        raise invalid_argument("JSON Parse error: the request body is not UTF-8 text") from None
    except json.JSONDecodeError as error:
        raise invalid_argument(f"JSON Parse error: {error.msg} at offset: {error.pos}") from None
    except RecursionError:  # arrays/objects nested about 1,000 deep overflow the decoder's stack
        raise invalid_argument("JSON Parse error: the document is nested too deeply") from None
    except ValueError as error:  # a number with more than 4,300 digits (Python's int conversion limit)
        raise invalid_argument(f"JSON Parse error: {error}") from None
    if not isinstance(document, dict):
        raise invalid_argument(f"JSON Value: {_preview(document)} Is not object")
    signature_name = document.get("signature_name", "")
    if not isinstance(signature_name, str):
        raise invalid_argument(f"JSON Value: {_preview(document)} not formatted correctly. "
                               f"'signature_name' key must be a string value.")
    has_instances, has_inputs = "instances" in document, "inputs" in document
    if has_instances and has_inputs:
        raise invalid_argument(f"JSON Value: {_preview(document)} Not formatted correctly expecting only one of "
                               f"'inputs' or 'instances' keys to exist")
    if not has_instances and not has_inputs:
        raise invalid_argument("Missing 'inputs' or 'instances' key")
    if has_instances:
        instances = document["instances"]
        if not isinstance(instances, list):
            raise invalid_argument(f"JSON Value: {_preview(document)} Expecting 'instances' to be an list/array")
        if not instances:
            raise invalid_argument(f"JSON Value: {_preview(document)} No values in 'instances' array")
        return signature_name, {"instances": instances}, True
    return signature_name, {"inputs": document["inputs"]}, False


def to_tensors(raw: dict, row_format: bool, signature: Signature) -> dict[str, np.ndarray]:
    """Raw JSON values -> numpy arrays of the signature's input dtypes."""
    try:
        return _to_tensors(raw, row_format, signature)
    except RecursionError:  # lists nested hundreds deep: the walks below recurse once per level
        raise invalid_argument(f"the inputs are nested too deeply for signature inputs "
                               f"{{{','.join(signature.inputs)}}}") from None


def _to_tensors(raw: dict, row_format: bool, signature: Signature) -> dict[str, np.ndarray]:
    names = list(signature.inputs)
    if row_format:
        instances = raw["instances"]
        if len(names) > 1 and not _is_named(instances[0]):
            raise invalid_argument("instances is a plain list, but expecting list of objects as multiple input "
                                   "tensors required as per tensorinfo_map")
        if len(names) == 1 and not _is_named(instances[0]):
            columns = {names[0]: instances}
        else:
            columns = {name: [] for name in names}
            for index, instance in enumerate(instances):
                if not _is_named(instance) or set(instance) != set(names):
                    raise invalid_argument(f"Failed to process element: {index} of 'instances' list. "
                                           f"JSON object: {_preview(instance)} must only have keys: {','.join(names)}")
                for name in names:
                    columns[name].append(instance[name])
        return {name: _array(values, signature.inputs[name], name) for name, values in columns.items()}
    value = raw["inputs"]
    if isinstance(value, dict) and not _is_b64(value):
        return {name: _array(item, signature.inputs.get(name), name) for name, item in value.items()}
    if len(names) != 1:
        raise invalid_argument("inputs is a plain value/list, but expecting an object as multiple input tensors "
                               "required as per tensorinfo_map")
    return {names[0]: _array(value, signature.inputs[names[0]], names[0])}


def _is_b64(value) -> bool:
    return isinstance(value, dict) and len(value) == 1 and "b64" in value


def _is_named(instance) -> bool:
    return isinstance(instance, dict) and not _is_b64(instance)


def _array(value, spec: TensorSpec | None, name: str) -> np.ndarray:
    if spec is None:  # unknown input: let the signature check name it
        return np.zeros([0])
    if spec.dtype == types_pb2.DT_STRING:
        strings = _strings(value, name)
        array = np.empty(_shape(strings, name), dtype=object)
        array[...] = strings
        return array
    if spec.dtype == types_pb2.DT_BOOL:
        check = lambda item: isinstance(item, bool)  # noqa: E731
    elif spec.np_dtype.kind in "iu":
        check = lambda item: isinstance(item, int) and not isinstance(item, bool)  # noqa: E731
    else:
        check = lambda item: isinstance(item, (int, float)) and not isinstance(item, bool)  # noqa: E731
    _check_leaves(value, check, name, spec.dtype_name)
    try:
        return np.array(value, dtype=spec.np_dtype)
    except (ValueError, OverflowError, TypeError) as error:
        raise invalid_argument(f"input {name}: {error}") from None


def _strings(value, name: str, path: str = ""):
    """Nested lists of str / {"b64"} -> the same nesting of bytes."""
    if isinstance(value, list):
        return [_strings(item, name, f"{path}[{index}]") for index, item in enumerate(value)]
    if isinstance(value, str):
        return value.encode("utf-8")
    if _is_b64(value):
        return _b64decode(value["b64"], f"{name}{path}")
    if isinstance(value, dict):
        raise invalid_argument(f"JSON Value: {_preview(value)} not formatted correctly for base64 data")
    raise invalid_argument(f"JSON Value: {_preview(value)} Type: {_json_type(value)} is not of expected type: string")


def _b64decode(text, where: str) -> bytes:
    if not isinstance(text, str):
        raise invalid_argument(f"JSON Value: {_preview({'b64': text})} not formatted correctly for base64 data")
    if "-" in text or "_" in text:
        raise invalid_argument(f"Unable to base64 decode {where}: it is URL-safe base64 ('-' or '_'); "
                               f"TF Serving takes the standard alphabet ('+' and '/')")
    if not _BASE64.match(text):
        raise invalid_argument(f"Unable to base64 decode {where}: characters outside the base64 alphabet "
                               f"or misplaced '=' padding")
    if len(text.rstrip("=")) % 4 == 1:  # 6 bits left over: no padding can complete it
        raise invalid_argument(f"Unable to base64 decode {where}: {len(text.rstrip('='))} characters is not "
                               f"a valid base64 length")
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise invalid_argument(f"Unable to base64 decode {where}") from None


def _check_leaves(value, check, name: str, dtype_name: str) -> None:
    if isinstance(value, list):
        for item in value:
            _check_leaves(item, check, name, dtype_name)
    elif not check(value):
        expected = dtype_name.removeprefix("DT_").lower()
        raise invalid_argument(f"JSON Value: {_preview(value)} Type: {_json_type(value)} is not of expected type: "
                               f"{expected}")


def _shape(value, name: str) -> tuple[int, ...]:
    """Shape of nested lists, which must be rectangular."""
    if not isinstance(value, list):
        return ()
    shapes = {_shape(item, name) for item in value}
    if len(shapes) > 1:
        raise invalid_argument(f"input {name}: the lists have different lengths at the same level")
    return (len(value), *(shapes.pop() if shapes else ()))


def _json_type(value) -> str:
    """rapidjson's type names, which TF Serving's messages use."""
    if value is None:
        return "Null"
    if isinstance(value, bool):
        return "True" if value else "False"
    return {int: "Number", float: "Number", str: "String", list: "Array", dict: "Object"}.get(type(value), "Value")


def _preview(value, limit: int = 120) -> str:
    text = json.dumps(value, separators=(",", ":"))
    return text if len(text) <= limit else text[:limit] + "..."


def predictions_json(outputs: dict[str, np.ndarray], row_format: bool) -> dict:
    """Model outputs -> the response document, shaped as TF Serving shapes it."""
    values = {name: _jsonable(array) for name, array in sorted(outputs.items())}
    if row_format:
        if len(values) == 1:
            return {"predictions": next(iter(values.values()))}
        count = len(next(iter(values.values())))
        return {"predictions": [{name: value[index] for name, value in values.items()} for index in range(count)]}
    if len(values) == 1:
        return {"outputs": next(iter(values.values()))}
    return {"outputs": values}


def _jsonable(array: np.ndarray):
    if array.dtype == object:
        return _strings_out(array.tolist())
    return array.tolist()


def _strings_out(value):
    if isinstance(value, list):
        return [_strings_out(item) for item in value]
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return {"b64": base64.b64encode(value).decode("ascii")}
    return value
