"""KServe v2 (the Open Inference Protocol) in and out of plain values: no I/O.

::

    POST /v2/models/NAME/infer
      body: JSON header [+ binary tensors]  (Inference-Header-Content-Length = header bytes)
        -> parse_infer() -> InferRequest: {input name: ndarray}, the outputs asked for
        -> the gateway calls service NAME, method ``infer``, with that dict
      {output name: ndarray} <- the handler's reply
        -> infer_reply() -> (JSON header [+ binary tensors], header length or None)

A model is a service; its handler's ``infer`` takes ``{input_name: ndarray}`` and returns
``{output_name: array-like}``. Tensor data comes as JSON lists (flat or nested, row-major)
or, with the binary tensor extension, as raw little-endian bytes after the JSON header,
in the order of the inputs that say ``parameters.binary_data_size``. Outputs go back
binary when the request asks so (``parameters.binary_data`` on an output, or
``binary_data_output`` on the request), else as JSON lists.

``BYTES`` and ``BF16`` tensors are refused (400): numpy has no fixed-size form of the
first that the pool's codec carries, nor any of the second.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from workerpool.gateway.bodies import BodyError
from workerpool.gateway.statuses import error_map

INFER_METHOD = "infer"
"""The handler method a model's inference calls."""
METADATA_METHOD = "metadata"
"""A handler method that, when the service has it, describes the model's ``inputs`` and
``outputs`` for ``GET /v2/models/NAME`` (a map merged into the reply)."""
HEADER_LENGTH = "inference-header-content-length"

# KServe datatype -> numpy dtype string (little-endian, as the binary extension sends).
DATATYPES: dict[str, str] = {
    "BOOL": "|b1", "UINT8": "|u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8",
    "INT8": "|i1", "INT16": "<i2", "INT32": "<i4", "INT64": "<i8",
    "FP16": "<f2", "FP32": "<f4", "FP64": "<f8",
}
_BY_KIND = {(v[1], int(v[2:])): k for k, v in DATATYPES.items()}  # (numpy kind, itemsize)
UNSUPPORTED = {"BYTES", "BF16"}


def _bad(message: str) -> BodyError:
    return BodyError(error_map("PayloadError", message, code="bad-body"))


@dataclass
class InferRequest:
    """What a v2 infer request asks: its id, the inputs, and which outputs how."""

    id: str | None
    inputs: dict[str, Any]
    outputs: list[tuple[str, bool]] | None  # (name, binary); None: every output
    binary: bool  # the request's binary_data_output: the default for outputs not named
    timeout: float | None = None  # seconds, from the request's ``parameters.timeout`` (µs)
    parameters: dict[str, Any] = field(default_factory=dict)


def _header_length(value: str | None, size: int) -> int | None:
    if value is None:
        return None
    if not value.strip().isdigit() or int(value) > size:
        raise _bad(f"Inference-Header-Content-Length {value[:40]!r} is not a length within "
                   f"the body's {size} bytes")
    return int(value)


def _shape(spec: dict, name: str) -> list[int]:
    shape = spec.get("shape")
    if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise _bad(f"input {name!r}: shape must be a list of non-negative integers")
    return shape


def _dtype(spec: dict, name: str) -> str:
    kind = spec.get("datatype")
    if kind in UNSUPPORTED:
        raise _bad(f"input {name!r}: datatype {kind} is not supported (only fixed-size "
                   f"numeric and BOOL: {', '.join(DATATYPES)})")
    if kind not in DATATYPES:
        raise _bad(f"input {name!r}: unknown datatype {str(kind)[:40]!r}")
    return DATATYPES[kind]


def parse_infer(body: bytes, header_length: str | None) -> InferRequest:
    """The request in ``body`` (and the Inference-Header-Content-Length header's value).
    Raises BodyError (400) for anything malformed."""
    import json

    import numpy as np

    hl = _header_length(header_length, len(body))
    head, raw = (body, b"") if hl is None else (body[:hl], memoryview(body)[hl:])
    try:
        doc = json.loads(head)
    except (ValueError, RecursionError) as exc:
        raise _bad(f"inference header is not valid JSON: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list):
        raise _bad("inference request must be an object with an 'inputs' list")
    params = doc.get("parameters") or {}
    if not isinstance(params, dict):
        raise _bad("'parameters' must be an object")
    inputs: dict[str, Any] = {}
    at = 0
    for spec in doc["inputs"]:
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise _bad("each input must be an object with a 'name'")
        name = spec["name"]
        if name in inputs:
            raise _bad(f"input {name!r} is given twice")
        shape, dtype = _shape(spec, name), np.dtype(_dtype(spec, name))
        count = 1
        for d in shape:
            count *= d
        size = (spec.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) \
                    or size != count * dtype.itemsize or at + size > len(raw):
                raise _bad(f"input {name!r}: binary_data_size {size!r} does not match its "
                           f"shape {shape} of {spec['datatype']} or the bytes sent")
            arr = np.frombuffer(raw[at:at + size], dtype=dtype).reshape(shape)
            at += size
        else:
            if "data" not in spec:
                raise _bad(f"input {name!r} has neither 'data' nor binary_data_size")
            try:
                arr = np.asarray(spec["data"], dtype=dtype)
            except (TypeError, ValueError, OverflowError) as exc:
                raise _bad(f"input {name!r}: data does not fit {spec['datatype']}: "
                           f"{exc}") from None
            if arr.size != count:
                raise _bad(f"input {name!r}: {arr.size} values for shape {shape}")
            arr = arr.reshape(shape)
        inputs[name] = arr
    if at != len(raw):
        raise _bad(f"{len(raw) - at} bytes after the inference header belong to no input")
    outputs = None
    if doc.get("outputs") is not None:
        if not isinstance(doc["outputs"], list):
            raise _bad("'outputs' must be a list")
        outputs = []
        for spec in doc["outputs"]:
            if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
                raise _bad("each requested output must be an object with a 'name'")
            binary = (spec.get("parameters") or {}).get("binary_data", False)
            outputs.append((spec["name"], binary is True))
    timeout = params.get("timeout")
    seconds = timeout / 1e6 if isinstance(timeout, int | float) and not isinstance(
        timeout, bool) and timeout > 0 else None
    rid = doc.get("id")
    return InferRequest(str(rid) if rid is not None else None, inputs, outputs,
                        params.get("binary_data_output") is True, seconds, params)


def datatype_of(arr: Any) -> str:
    """The KServe datatype of a numpy array; ValueError for one it has none for."""
    kind = _BY_KIND.get((arr.dtype.kind, arr.dtype.itemsize))
    if kind is None:
        raise ValueError(f"an output of dtype {arr.dtype} has no KServe datatype")
    return kind


def infer_reply(model: str, req: InferRequest, result: Any) -> tuple[bytes, int | None]:
    """The reply body for ``result`` (the handler's ``{output name: array-like}``), and
    the length of its JSON header when binary tensors follow it (else None). Raises
    BodyError (500) when the result is not such a map or an output has no datatype, and
    (400) when the request named an output the handler did not return."""
    import json

    import numpy as np

    if not isinstance(result, dict) or not all(isinstance(k, str) for k in result):
        raise BodyError(error_map("HandlerError", f"model {model!r}: infer must return a "
                                  f"map of output name to array, got {type(result).__name__}",
                                  remote_type="BadInferResult"))
    wanted = req.outputs if req.outputs is not None else [(n, req.binary) for n in result]
    outputs, blobs = [], []
    for name, binary in wanted:
        if name not in result:
            raise _bad(f"model {model!r} has no output {name!r}; it returned: "
                       f"{', '.join(sorted(result)) or 'none'}")
        arr = np.asarray(result[name])
        try:
            kind = datatype_of(arr)
        except ValueError as exc:
            raise BodyError(error_map("HandlerError", f"model {model!r}, output {name!r}: "
                                      f"{exc}", remote_type="BadInferResult")) from None
        out: dict[str, Any] = {"name": name, "datatype": kind, "shape": list(arr.shape)}
        if binary:
            data = np.ascontiguousarray(arr, dtype=np.dtype(DATATYPES[kind])).tobytes()
            out["parameters"] = {"binary_data_size": len(data)}
            blobs.append(data)
        else:
            out["data"] = arr.reshape(-1).tolist()
        outputs.append(out)
    doc: dict[str, Any] = {"model_name": model, "outputs": outputs}
    if req.id is not None:
        doc["id"] = req.id
    head = json.dumps(doc, separators=(",", ":")).encode()
    if not blobs:
        return head, None
    return b"".join([head, *blobs]), len(head)


def model_metadata(model: str, described: Any) -> dict[str, Any]:
    """``GET /v2/models/NAME``: the name, platform, and what the handler's ``metadata``
    method returned (``inputs``, ``outputs``, ...) when it has one."""
    doc: dict[str, Any] = {"name": model, "versions": ["1"], "platform": "workerpool",
                           "inputs": [], "outputs": []}
    if isinstance(described, dict):
        doc.update({str(k): v for k, v in described.items() if k != "name"})
    return doc


def error_json(body: dict[str, Any]) -> bytes:
    """A v2 error reply: ``{"error": "<type>: <message>"}``, the protocol's one string."""
    import json

    return json.dumps({"error": f"{body.get('type')}: {body.get('message')}"}).encode()
