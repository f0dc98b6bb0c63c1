"""What a handler's exception means for the worker that raised it.

``classify(exc)`` sorts an exception into one of three fates, from the real exception
types and messages of PyTorch and CuPy, without importing either:

- ``POISONED`` — a sticky CUDA error (illegal address, device-side assert, launch
  failure, misaligned address, illegal instruction, hardware stack error, ECC, ...). The
  CUDA runtime documents that "any further CUDA work will return the same error ... the
  process must be terminated and relaunched". The worker answers the request with
  ``WorkerCrashedError`` (cause ``context-poisoned``), tells the router why, and exits at
  once (``os._exit``: no atexit hook or destructor may touch the dead context).
- ``EXHAUSTED`` — out of device memory. Not sticky: the request fails with a retryable
  ``ResourceExhaustedError``, cached memory is released, and the worker stays.
- ``DOMAIN`` — anything else: the handler's own error (``HandlerError``); the worker stays.

Classification is by CUDA error code where the exception carries one
(``torch.AcceleratorError.error_code``, CuPy's ``CUDARuntimeError.status``), else by the
message text that PyTorch and CuPy put in it (older PyTorch raises a plain RuntimeError).
"""

from __future__ import annotations

import enum
import re
import sys

from ipc.lifecycle import GoodbyeReason


class Fate(enum.Enum):
    DOMAIN = "domain"
    EXHAUSTED = "resource-exhausted"
    # The worker leaves with this as its GOODBYE reason and its WorkerCrashedError's cause.
    POISONED = GoodbyeReason.CONTEXT_POISONED.value


# cudaError_t values the CUDA Runtime API documents as sticky (plus ECC and MPS loss).
STICKY_CUDA_ERRORS = {
    214: "cudaErrorECCUncorrectable",
    700: "cudaErrorIllegalAddress",
    702: "cudaErrorLaunchTimeout",
    710: "cudaErrorAssert",
    714: "cudaErrorHardwareStackError",
    715: "cudaErrorIllegalInstruction",
    716: "cudaErrorMisalignedAddress",
    717: "cudaErrorInvalidAddressSpace",
    718: "cudaErrorInvalidPc",
    719: "cudaErrorLaunchFailure",
    810: "cudaErrorMpsClientTerminated",
}
CUDA_OUT_OF_MEMORY = 2  # cudaErrorMemoryAllocation

# Message fragments, as PyTorch ("CUDA error: <text>") and CuPy ("cudaErrorX: <text>" or
# "CUDA_ERROR_X: <text>") print them.
_POISONED_TEXT = re.compile(
    "|".join([
        r"illegal memory access",
        r"device-side assert",
        r"unspecified launch failure",
        r"misaligned address",
        r"illegal instruction",
        r"hardware stack error",
        r"uncorrectable ECC error",
        r"invalid program counter",
        r"the launch timed out and was terminated",
        r"MPS client.*terminated",
        *STICKY_CUDA_ERRORS.values(),
        r"CUDA_ERROR_(ILLEGAL_ADDRESS|ASSERT|LAUNCH_FAILED|MISALIGNED_ADDRESS|"
        r"ILLEGAL_INSTRUCTION|HARDWARE_STACK_ERROR|ECC_UNCORRECTABLE|INVALID_PC|"
        r"LAUNCH_TIMEOUT|INVALID_ADDRESS_SPACE)",
    ]),
    re.IGNORECASE,
)
_OOM_TEXT = re.compile(r"CUDA out of memory|cudaErrorMemoryAllocation|CUDA_ERROR_OUT_OF_MEMORY|"
                       r"out of memory allocating", re.IGNORECASE)
_OOM_TYPES = {"OutOfMemoryError"}  # torch.cuda.OutOfMemoryError, cupy.cuda.memory.OutOfMemoryError


def _cuda_code(exc: BaseException) -> int | None:
    for attr in ("error_code", "status"):  # torch.AcceleratorError, CuPy CUDARuntimeError
        code = getattr(exc, attr, None)
        if isinstance(code, int) and not isinstance(code, bool):
            return code
    return None


def classify(exc: BaseException) -> Fate:
    """The fate of a worker whose handler raised ``exc`` (see the module docstring)."""
    for e in _chain(exc):
        code = _cuda_code(e)
        if code is not None and is_cuda_error(e):
            if code in STICKY_CUDA_ERRORS:
                return Fate.POISONED
            if code == CUDA_OUT_OF_MEMORY:
                return Fate.EXHAUSTED
        name = type(e).__name__
        text = str(e)
        if name in _OOM_TYPES or _OOM_TEXT.search(text):
            return Fate.EXHAUSTED
        if is_cuda_error(e) and _POISONED_TEXT.search(text):
            return Fate.POISONED
    return Fate.DOMAIN


def fate_of(exc: BaseException) -> Fate:
    """``classify``, and then an unlisted CUDA error that left the context unusable (a bare
    synchronize fails) is ``POISONED`` too."""
    fate = classify(exc)
    if fate is Fate.DOMAIN and is_cuda_error(exc) and not context_alive():
        fate = Fate.POISONED
    return fate


def _chain(exc: BaseException, limit: int = 8):
    """The exception and its causes/contexts: a handler may wrap the CUDA error."""
    seen = 0
    while exc is not None and seen < limit:
        yield exc
        exc = exc.__cause__ or exc.__context__
        seen += 1


def is_cuda_error(exc: BaseException) -> bool:
    """Only runtime errors from CUDA stacks count: a ValueError mentioning 'device-side
    assert' in its text is still the handler's own business."""
    name = type(exc).__name__
    module = type(exc).__module__ or ""
    return (name in {"AcceleratorError", "CUDARuntimeError", "CUDADriverError", "CUDAError",
                     "CudaAPIError"}
            or module.startswith(("torch", "cupy", "cupy_backends", "numba", "cuda"))
            or (isinstance(exc, RuntimeError) and "CUDA" in str(exc)))


def context_alive() -> bool:
    """Probe the CUDA context after an unclassified CUDA exception: a poisoned context
    fails even a bare synchronize. True when no GPU framework is loaded."""
    torch = sys.modules.get("torch")
    if torch is not None and getattr(torch, "cuda", None) is not None:
        try:
            if torch.cuda.is_initialized():
                torch.cuda.synchronize()
        except Exception:
            return False
    cupy = sys.modules.get("cupy")
    if cupy is not None:
        try:
            cupy.cuda.Device().synchronize()
        except Exception:
            return False
    return True


def release_cached_memory() -> None:
    """After an OOM: give the frameworks' cached blocks back so the next request fits."""
    torch = sys.modules.get("torch")
    if torch is not None:
        try:
            if torch.cuda.is_initialized():
                torch.cuda.empty_cache()
        except Exception:
            pass
    cupy = sys.modules.get("cupy")
    if cupy is not None:
        try:
            cupy.get_default_memory_pool().free_all_blocks()
            cupy.get_default_pinned_memory_pool().free_all_blocks()
        except Exception:
            pass
