"""numpy arrays and torch tensors in payloads: bit-exact round trips through the codec and a
real pool, every place the bytes can travel (inline, buffer frame, shared memory), every
malformed header refused with PayloadError, and no shared-memory segment left behind by a
killed worker or a client closed mid-request."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import math
import os
import signal
import time

import msgpack
import numpy as np
import pytest

from ipc import codec, protocol, shm
from ipc.codec import EXT_ARRAY, PayloadError
from ipc.protocol import Kind
from tests.conftest import Processes
from tests.raw import RawPeer
from workerpool import AsyncClient, Client, WorkerCrashedError
from workerpool import PayloadError as ClientPayloadError
from workerpool.cli import _json_default

torch = pytest.importorskip("torch")

NUMPY_DTYPES = ["bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
                "float16", "float32", "float64", "complex64", "complex128"]
TORCH_DTYPES = ["bool", "uint8", "int8", "int16", "int32", "int64", "uint16", "uint32", "uint64",
                "float16", "bfloat16", "float32", "float64", "complex32", "complex64",
                "complex128", "float8_e4m3fn", "float8_e5m2"]
TORCH_DTYPES = [d for d in TORCH_DTYPES if isinstance(getattr(torch, d, None), torch.dtype)]


def random_numpy(dtype: str, shape, seed: int = 0) -> np.ndarray:
    """Every bit pattern is fair game: random bytes viewed as the dtype (NaNs included)."""
    dt = np.dtype(dtype)
    n = int(np.prod(shape)) * dt.itemsize
    raw = np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)
    if dt.kind == "b":
        raw &= 1
    return raw.view(dt).reshape(shape)


def random_torch(dtype: str, shape, seed: int = 0) -> torch.Tensor:
    td = getattr(torch, dtype)
    n = int(np.prod(shape)) * td.itemsize
    raw = torch.from_numpy(np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8))
    if td == torch.bool:
        raw &= 1
    return raw.view(td).reshape(shape)


def same(a, b) -> bool:
    """Same type, dtype, shape and bytes."""
    if isinstance(a, np.ndarray):
        return (type(b) is np.ndarray and a.dtype == b.dtype and a.shape == b.shape
                and np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes())
    if isinstance(a, np.generic):
        return type(a) is type(b) and a.tobytes() == b.tobytes()
    if isinstance(a, torch.Tensor):
        return (isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
                and _tbytes(a) == _tbytes(b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, list) and len(a) == len(b) and all(map(same, a, b))
    return a == b


def _tbytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


@pytest.fixture
def segs():
    """A pool and a mapper in this process; nothing of them may be left in /dev/shm."""
    pool, mapper = shm.SegmentPool(), shm.SegmentMapper()
    yield pool, mapper
    names = pool.names()
    pool.close()
    mapper.close()
    assert not [n for n in names if os.path.exists(f"/dev/shm/{n}")]


def roundtrip(value, pool=None, mapper=None, **kw):
    body, buffers = codec.dumps(value, pool=pool, tag=1, **kw)
    out = codec.loads(body, buffers, mapper=mapper)
    if pool is not None:
        pool.finish(1)
    return out, buffers


# -- the codec alone --------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", NUMPY_DTYPES)
def test_every_numpy_dtype_bit_exact_in_every_place(dtype, segs):
    pool, mapper = segs
    for shape in [(3, 5), (1000,), (300, 1200)]:  # inline, one frame, shared memory
        a = random_numpy(dtype, shape)
        for p in (None, pool):
            out, _ = roundtrip({"a": a}, p, mapper)
            assert same(a, out["a"]), (dtype, shape)
            assert out["a"].flags.writeable
    be = random_numpy(dtype, (40, 40)).astype(np.dtype(dtype).newbyteorder(">"))
    out, _ = roundtrip(be)
    assert out.dtype == be.dtype and same(be, out)  # byte order is part of the dtype


@pytest.mark.parametrize("dtype", TORCH_DTYPES)
def test_every_torch_dtype_bit_exact_in_every_place(dtype, segs):
    pool, mapper = segs
    for shape in [(3, 5), (1000,), (600, 1000)]:
        t = random_torch(dtype, shape)
        for p in (None, pool):
            out, _ = roundtrip([t], p, mapper)
            assert same([t], out), (dtype, shape)


def test_layouts_scalars_and_empty(segs):
    pool, mapper = segs
    big = random_numpy("float32", (700, 800))
    tbig = random_torch("bfloat16", (600, 900))
    value = {
        "transposed": big.T, "strided": big[::3, 1::7], "fortran": np.asfortranarray(big),
        "neg_stride": big[::-1], "zero_d": np.array(3.5), "empty": np.zeros((0, 4), np.int16),
        "empty3": np.ones((2, 0, 3), np.complex64), "scalar": np.int16(-7),
        "bool_scalar": np.bool_(True), "f32_scalar": np.float32(1.5),
        "t_transposed": tbig.T, "t_slice": tbig[:, ::5], "t_zero_d": torch.tensor(2, dtype=torch.int8),
        "t_empty": torch.empty(0, 3), "t_conj": torch.ones(3, 3, dtype=torch.complex64).conj(),
        "t_neg": torch.arange(4.0)._neg_view(), "t_grad": torch.ones(3, requires_grad=True),
        "nested": [{"deep": (big[:2, :2], [tbig[:1, :3]])}],
    }
    out, _ = roundtrip(value, pool, mapper)
    expect = dict(value)
    expect["t_conj"] = value["t_conj"].resolve_conj()
    expect["t_neg"] = value["t_neg"].resolve_neg()
    expect["t_grad"] = value["t_grad"].detach()
    assert same(expect, out)
    assert out["fortran"].flags.c_contiguous  # bytes travel in C order
    assert type(out["scalar"]) is np.int16 and type(out["bool_scalar"]) is np.bool_
    assert out["zero_d"].shape == () and out["t_zero_d"].shape == ()


def test_places_chosen_by_size(segs):
    pool, mapper = segs
    small, mid, big = np.ones(10), np.ones(20_000), np.ones(2**18)  # 80 B, 160 KB, 2 MiB
    body, buffers = codec.dumps([small, mid, big], pool=pool, tag=7)
    assert len(buffers) == 1 and memoryview(buffers[0]).nbytes == mid.nbytes
    assert len(body) < 1000 and len(pool.names()) == 1  # big went to a segment
    out = codec.loads(body, buffers, mapper=mapper)
    assert same([small, mid, big], out)
    _, buffers2 = codec.dumps([small, mid, big])  # no pool: big goes in a frame
    assert len(buffers2) == 2


def test_segments_are_reused_only_when_free(segs):
    pool, mapper = segs
    a = np.arange(2**19, dtype=np.float64)  # 4 MiB
    body, _ = codec.dumps(a, pool=pool, tag=1)
    held = codec.loads(body, mapper=mapper)
    pool.finish(1)
    codec.dumps(a, pool=pool, tag=2)
    assert pool.created == 2  # the first is still mapped by a live array
    pool.finish(2)
    codec.dumps(a + 1, pool=pool, tag=3)  # 2 was never taken but is finished: reused
    assert pool.created == 2
    assert same(a, held)  # a reused segment never changes an array that is alive
    del held
    gc.collect()
    pool.finish(3)
    codec.dumps(a, pool=pool, tag=4)
    codec.dumps(a, pool=pool, tag=5)
    assert pool.created == 2
    with pytest.raises(PayloadError, match=r"stale handle|being rewritten"):
        codec.loads(body, mapper=mapper)  # its segment now holds another message


def test_request_segments_wait_for_finish(segs):
    """The router may run a request again on another worker: the client keeps its
    segments until the final reply, even after a worker took and released them."""
    pool, mapper = segs
    a = np.ones(2**18)
    body, _ = codec.dumps(a, pool=pool, tag=1)
    out = codec.loads(body, mapper=mapper)
    del out
    gc.collect()
    codec.dumps(a, pool=pool, tag=2)
    assert pool.created == 2
    assert same(a, codec.loads(body, mapper=mapper))  # a retry still reads the data


def test_reply_segments_free_once_taken_and_released(segs):
    pool, mapper = segs
    a = np.ones(2**18)
    body, _ = codec.dumps(a, pool=pool)  # untagged: a reply
    codec.dumps(a, pool=pool)
    assert pool.created == 2  # the first was not taken yet
    out = codec.loads(body, mapper=mapper)
    del out
    gc.collect()
    codec.dumps(a, pool=pool)
    assert pool.created == 2


def test_failed_encode_returns_its_segments(segs):
    pool, _ = segs
    with pytest.raises(PayloadError, match="cannot encode object"):
        codec.dumps([np.ones(2**18), object()], pool=pool, tag=1)
    codec.dumps(np.ones(2**18), pool=pool, tag=2)
    assert pool.created == 1


def test_pool_limit_falls_back_to_frames():
    pool = shm.SegmentPool(max_bytes=3 * 2**20)
    try:
        body, buffers = codec.dumps([np.ones(2**18), np.ones(2**18)], pool=pool, tag=1)
        assert pool.created == 1 and len(buffers) == 1  # the second would not fit
        mapper = shm.SegmentMapper()
        assert same([np.ones(2**18)] * 2, codec.loads(body, buffers, mapper=mapper))
    finally:
        pool.close()


def test_mapper_drops_mappings_of_unlinked_segments(segs):
    pool, mapper = segs
    body, _ = codec.dumps(np.ones(2**18), pool=pool)
    codec.loads(body, mapper=mapper)
    gc.collect()
    (entry,) = mapper._cache.values()
    pool.close()
    mapper.trim()
    assert not mapper._cache and entry.fd == -1  # the memory is not kept alive here


def test_endpoint_trims_pool_and_mapper_at_most_once_an_interval(monkeypatch):
    monkeypatch.setattr(shm, "IDLE_TRIM", 0.0)  # every segment and mapping is idle at once
    ep = shm.ShmEndpoint()
    try:
        t0 = time.monotonic()
        ep.maybe_trim(t0)
        body, _ = codec.dumps(np.ones(2**18), pool=ep.pool)
        codec.loads(body, mapper=ep.mapper)
        gc.collect()
        (name,) = ep.pool.names()
        ep.maybe_trim(t0 + shm.TRIM_INTERVAL / 2)  # too soon: nothing is given back
        assert ep.pool.names() == [name] and len(ep.mapper._cache) == 1
        ep.maybe_trim(t0 + shm.TRIM_INTERVAL)
        assert ep.pool.names() == [] and not ep.mapper._cache
        assert not os.path.exists(f"/dev/shm/{name}")
        codec.dumps(np.ones(2**18), pool=ep.pool)
        (name,) = ep.pool.names()
    finally:
        ep.close()
    assert ep.pool.names() == [] and not os.path.exists(f"/dev/shm/{name}")


@pytest.mark.filterwarnings("ignore:.*quantize")
def test_encode_refusals():
    for bad in [np.array(["a", "b"]), np.array([object()]), np.zeros(2, np.longdouble),
                np.zeros(3, "datetime64[s]"), np.ma.masked_array([1, 2], mask=[0, 1]),
                torch.zeros(3, 3).to_sparse(), torch.quantize_per_tensor(
                    torch.ones(2), 0.1, 0, torch.qint8)]:
        with pytest.raises(PayloadError):
            codec.dumps({"x": bad})
    with pytest.raises(PayloadError, match="over max_message_bytes"):
        codec.dumps([np.ones(1000), np.ones(1000)], max_bytes=12_000)


def ext(header) -> bytes:
    return msgpack.packb(msgpack.ExtType(EXT_ARRAY, msgpack.packb(header, use_bin_type=True)),
                         use_bin_type=True)


GOOD = {"k": "numpy", "dt": "<f4", "sh": [2, 3], "n": 24}


@pytest.mark.parametrize(("header", "buffers", "match"), [
    ("not a map", [], "not a map"),
    ({**GOOD, "x": b"\0" * 24, "extra": 1}, [], "unknown fields"),
    ({**GOOD, "k": "pickle", "x": b"\0" * 24}, [], "kind"),
    ({**GOOD, "dt": "|O8", "x": b"\0" * 24}, [], "dtype"),
    ({**GOOD, "dt": "<f16", "x": b"\0" * 32}, [], "dtype"),
    ({**GOOD, "k": "torch", "dt": "qint8", "x": b"\0" * 6}, [], "dtype"),
    ({**GOOD, "sh": "2x3", "x": b"\0" * 24}, [], "shape"),
    ({**GOOD, "sh": [1] * 65, "n": 4, "x": b"\0" * 4}, [], "shape"),
    ({**GOOD, "sh": [-2, -3], "x": b"\0" * 24}, [], "dimension"),
    ({**GOOD, "sh": [True, 3], "x": b"\0" * 24}, [], "dimension"),
    ({**GOOD, "sh": [2.0, 3], "x": b"\0" * 24}, [], "dimension"),
    ({**GOOD, "k": "numpy-scalar", "x": b"\0" * 24}, [], "scalar"),
    ({**GOOD, "n": 25, "x": b"\0" * 25}, [], "takes 24 bytes"),
    ({**GOOD, "n": -1, "x": b""}, [], "n \\(bytes\\)"),
    ({**GOOD, "sh": [2**40, 2**40], "n": 2**64 - 1, "b": 0}, [b""], "n \\(bytes\\)"),
    ({**GOOD, "sh": [2**40, 2**40], "n": 2**62, "b": 0}, [b""], "takes"),
    (dict(GOOD), [], "exactly one"),
    ({**GOOD, "x": b"\0" * 24, "b": 0}, [b"\0" * 24], "exactly one"),
    ({**GOOD, "x": b"\0" * 23}, [], "inline"),
    ({**GOOD, "x": "text"}, [], "inline"),
    ({**GOOD, "b": 1}, [b"\0" * 24], "buffer index"),
    ({**GOOD, "b": -1}, [b"\0" * 24], "buffer index"),
    ({**GOOD, "b": 0}, [], "has none"),
    ({**GOOD, "b": 0}, [b"\0" * 23], "23 bytes"),
    ({**GOOD, "x": b"\0" * 24}, [b"unused"], "not referenced"),
    ({**GOOD, "m": "wp-1-2-0123456789abcdef"}, [], "handle"),
    ({**GOOD, "m": ["wp-1-2-0123456789abcdef"]}, [], "handle"),
    ({**GOOD, "m": ["wp-1-2-0123456789abcdef", 0]}, [], "generation"),
])
def test_malformed_headers_are_payload_errors(header, buffers, match, segs):
    _, mapper = segs
    with pytest.raises(PayloadError, match=match):
        codec.loads(ext(header), buffers, mapper=mapper)


def test_malformed_shm_handles(segs):
    pool, mapper = segs
    for name in ["../../etc/passwd", "/dev/shm/wp-1-2-0123456789abcdef", "wp-1-2-XYZ",
                 "wp-1-2-0123456789abcdef/../x", ""]:
        with pytest.raises(PayloadError, match="does not match"):
            codec.loads(ext({**GOOD, "m": [name, 1]}), mapper=mapper)
    with pytest.raises(PayloadError, match="does not exist"):
        codec.loads(ext({**GOOD, "m": ["wp-1-2-0123456789abcdef", 1]}), mapper=mapper)
    body, _ = codec.dumps(np.ones(2**18), pool=pool)
    name, gen = msgpack.unpackb(msgpack.unpackb(body, ext_hook=lambda c, d: d))["m"]
    with pytest.raises(PayloadError, match="far larger"):  # would map 2 MiB for 24 bytes
        codec.loads(ext({**GOOD, "m": [name, gen]}), mapper=shm.SegmentMapper())
    with pytest.raises(PayloadError, match="generation"):
        codec.loads(ext({**GOOD, "dt": "<f8", "sh": [2**18], "n": 2**21, "m": [name, gen + 1]}),
                    mapper=mapper)
    cap = (pool._segs[0].capacity // 4) + 1
    with pytest.raises(PayloadError, match="holds"):
        codec.loads(ext({**GOOD, "sh": [cap], "n": cap * 4, "m": [name, gen]}), mapper=mapper)
    with pytest.raises(PayloadError, match="cannot map") as info:
        codec.loads(body)  # no mapper: not allowed to map, says so with a code
    assert info.value.code == codec.SHM_UNREACHABLE
    with pytest.raises(PayloadError, match="over max_message_bytes"):
        codec.loads(body, mapper=mapper, max_bytes=2**20)
    with pytest.raises(PayloadError, match="unknown msgpack extension type 5"):
        codec.loads(msgpack.packb(msgpack.ExtType(5, b"")))
    with pytest.raises(PayloadError, match="not msgpack"):
        codec.loads(msgpack.packb(msgpack.ExtType(EXT_ARRAY, b"\xc1")))


class _OnDevice(torch.Tensor):
    """A CPU tensor that says it is on cuda:0 and records the calls made on it: the encoder's
    device branch, run without a GPU. Its ``to`` returns a new tensor, as a real
    device-to-host copy does."""

    calls: list[str] = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if getattr(func, "__self__", None) is torch._C.TensorBase.device:  # the property
            return torch.device("cuda", 0)
        name = getattr(func, "__name__", "")
        cls.calls.append(name)
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **(kwargs or {}))
            if name == "to":
                out = out.clone()
        return out.as_subclass(cls) if name in ("detach", "resolve_conj", "resolve_neg") else out


@pytest.mark.parametrize("shape", [(8, 16), (600, 512)])  # inline; a frame or shared memory
def test_a_device_tensor_moves_to_host_exactly_once(shape):
    """The decision logic of the CUDA path (ipc/arrays.py), on the CPU: a tensor on a device
    is copied to the host once, by ``.to("cpu")`` into a frame or inline bytes, or by one
    ``copy_`` straight into the shared-memory segment; transposed (non-contiguous) too.
    tests marked gpu below do it with a real CUDA tensor."""
    t = torch.arange(math.prod(shape), dtype=torch.float32).reshape(shape).T
    pool, mapper = shm.SegmentPool(), shm.SegmentMapper()
    try:
        big = t.numel() * t.element_size() >= codec.SHM_THRESHOLD
        for p, copy in ((None, "to"), (pool, "copy_" if big else "to")):
            _OnDevice.calls.clear()
            out, _ = roundtrip(t.as_subclass(_OnDevice), p, mapper)
            moves = [c for c in _OnDevice.calls if c in ("to", "copy_", "cpu", "numpy",
                                                         "contiguous", "tolist")]
            assert moves == [copy], _OnDevice.calls
            assert type(out) is torch.Tensor and out.device.type == "cpu"
            assert torch.equal(out, t)
    finally:
        pool.close()
        mapper.close()


@pytest.mark.gpu
def test_cuda_tensor_arrives_as_cpu_tensor():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device here; bin/gpu-check runs the gpu-marked tests")
    t = random_torch("bfloat16", (1024, 1024)).cuda()
    pool, mapper = shm.SegmentPool(), shm.SegmentMapper()
    try:
        for p in (None, pool):
            out, _ = roundtrip({"t": t.T}, p, mapper)
            assert out["t"].device.type == "cpu" and same(t.T.cpu(), out["t"])
    finally:
        pool.close()


def test_handler_tensor_on_its_device_comes_back_on_cpu(tpool):
    """The CPU run of what a GPU worker does when a handler returns a CUDA tensor."""
    a = random_numpy("float32", (600, 700))
    with Client(tpool.address, timeout=30) as c:
        for use in (a, a[:4, :5]):  # through shared memory, and inline
            out = c.call("to_device", use)
            assert isinstance(out, torch.Tensor) and out.device.type == "cpu"
            assert same(torch.from_numpy(np.ascontiguousarray(use)), out)


@pytest.mark.gpu
def test_gpu_worker_returns_cuda_tensor(procs):
    from workerpool.devices import CPU, parse_devices

    if parse_devices("auto") == [CPU]:
        pytest.skip("no NVIDIA GPU here; bin/gpu-check runs the gpu-marked tests")
    pool = procs.pool("--devices", "auto", handler="tests.handlers:Tensors", workers=1)
    a = random_numpy("float32", (2048, 1024))
    for use_shm in (True, False):
        with Client(pool.address, timeout=60, shm=use_shm) as c:
            out = c.call("to_device", a)
            assert out.device.type == "cpu" and same(torch.from_numpy(a), out)


def test_router_and_supervisor_import_neither_numpy_nor_torch():
    import subprocess
    import sys

    code = ("import sys, router.router, workerpool.supervisor, workerpool.worker, "
            "workerpool.client; print('numpy' in sys.modules, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(__file__)), timeout=60)
    assert out.stdout.split() == ["False", "False"], out.stderr


def test_cli_renders_arrays_as_json():
    assert _json_default(np.arange(3)) == [0, 1, 2]
    assert _json_default(torch.tensor([[1.5]], dtype=torch.bfloat16)) == [[1.5]]
    assert _json_default(np.float32(2.5)) == 2.5
    assert _json_default(np.zeros((100, 100))) == {"type": "numpy.ndarray", "dtype": "float64",
                                                   "shape": [100, 100]}
    assert _json_default(torch.zeros(2, dtype=torch.complex64))["dtype"] == "complex64"


# -- through a real pool ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def tpool():
    p = Processes()
    try:
        yield p.pool(workers=2, handler="tests.handlers:Tensors")
    finally:
        p.cleanup()


def everything(seed: int = 0) -> dict:
    big = random_numpy("float32", (1024, 1024), seed)  # 4 MiB: shared memory when local
    return {
        "numpy": {d: random_numpy(d, (7, 3), seed) for d in NUMPY_DTYPES},
        "torch": {d: random_torch(d, (5, 2), seed) for d in TORCH_DTYPES},
        "big": [big, big.T, big[::2, ::3], torch.from_numpy(big).to(torch.bfloat16)],
        "mid": (random_numpy("complex128", (100, 100), seed),),
        "edge": [np.zeros((0, 5)), np.array(1.0), torch.empty(3, 0), np.uint64(2**64 - 1)],
        "plain": {"s": "text", "b": b"bytes", "i": -1},
    }


@pytest.mark.parametrize("use_shm", [True, False])
def test_pool_round_trip_of_everything(tpool, use_shm):
    value = everything()
    with Client(tpool.address, timeout=30, shm=use_shm) as c:
        assert (c.shm_host is not None) == use_shm
        for _ in range(3):  # the second and third reuse segments
            assert same(value, c.call("echo", value))
        seen = c.call("describe", {"a": value["big"][0], "t": value["big"][3]})
        assert seen["a"] == {"type": "numpy.ndarray", "dtype": "float32", "shape": [1024, 1024],
                             "writeable": True}
        assert seen["t"]["type"] == "torch.Tensor" and seen["t"]["dtype"] == "torch.bfloat16"
        a = np.arange(2**20, dtype=np.int32)
        assert same(a + 1, c.call("add_one", a))
        assert same(a, a)  # the caller's array is untouched by the handler's change
        items = list(c.stream("hold", {"a": a, "seconds": 0}))
        assert same(a, items[0]) and items[1] == "done"
        if use_shm:
            assert c._pool.created >= 1 and c._mapper.mapped >= 1


def test_async_client_round_trip(tpool):
    value = everything(seed=3)

    async def main():
        async with AsyncClient(tpool.address, timeout=30) as c:
            assert same(value, await c.call("echo", value))
            items = [x async for x in c.stream("hold", {"a": value["big"][0], "seconds": 0})]
            assert same(value["big"][0], items[0])
            return c._pool.names()

    names = asyncio.run(main())
    assert names and not [n for n in names if os.path.exists(f"/dev/shm/{n}")]


def test_malformed_tensor_request_gets_error_and_worker_keeps_serving(tpool):
    peer = RawPeer(tpool.address)
    try:
        bad = [ext({**GOOD, "n": 99, "x": b"\0" * 99}),
               ext({**GOOD, "dt": "|O8", "x": b"\0" * 24}),
               ext({**GOOD, "sh": [-2, -3], "x": b"\0" * 24}),
               ext({**GOOD, "k": "torch", "dt": "bfloat16", "x": b"\0" * 24}),
               ext({**GOOD, "b": 3}),
               ext({**GOOD, "m": ["../../../etc/passwd", 1]}),
               ext({**GOOD, "sh": [2**20, 2**20], "n": 2**42, "m": ["wp-1-2-0123456789abcdef", 1]})]
        for i, body in enumerate(bad, 1):
            peer.send(protocol.encode(Kind.REQUEST, i, {"method": "echo", "shm": shm.host_id()},
                                      body))
            kind, rid, err = peer.reply(10)
            assert (kind, rid, err["type"]) == (Kind.ERROR, i, "PayloadError"), err
        assert "over max_message_bytes" in err["message"]  # checked before mapping anything
        peer.request(99, "echo", "still here")
        assert peer.reply(10) == (Kind.RESULT, 99, "still here")
    finally:
        peer.close()
    st = tpool.status()
    assert st["router"]["counters"].get("internal_errors", 0) == 0
    assert all(w["restarts"] == 0 for w in st["workers"])


def test_client_size_limit_counts_shared_memory(tpool):
    with Client(tpool.address, timeout=30, max_message_bytes=2**20) as c:
        with pytest.raises(ClientPayloadError, match="over max_message_bytes"):
            c.call("echo", np.ones(2**18))  # 2 MiB: would be a tiny frame, still refused
        assert c._pool.names() == []  # refused before anything was copied


def test_worker_on_another_host_gets_frames(tpool):
    """A worker that cannot map the client's segments answers shm-unreachable; the client
    sends the request again with frames, and keeps doing so for that service. Both
    clients."""
    a = random_numpy("float64", (512, 512))
    with Client(tpool.address, timeout=30) as c:
        c.shm_host = "elsewhere"  # as a client on another host looks to the workers
        assert same(a, c.call("echo", a))
        assert c._frames_only == {None}
        created = c._pool.created
        assert same(a, c.call("echo", a))
        assert c._pool.created == created  # no segment for this service any more

    async def main():  # the same from AsyncClient, which sends it again from its reader
        async with AsyncClient(tpool.address, timeout=30) as ac:
            ac.shm_host = "elsewhere"
            assert same(a, await ac.call("echo", a))
            assert ac._frames_only == {None}

    asyncio.run(main())


def test_the_array_example_of_docs_handlers_md(procs, monkeypatch):
    """The handler and the call of handlers.md, "Arrays and tensors", run as written: the
    reply holds a torch tensor and a numpy array, not lists."""
    import re
    from pathlib import Path

    doc = (Path(__file__).parent.parent / "docs" / "handlers.md").read_text()
    section = doc.split("## Arrays and tensors\n", 1)[1].split("\n## ", 1)[0]
    handler_code, call_code = re.findall(r"```python\n(.*?)```", section, re.S)[:2]
    (procs.dir / "doc_arrays.py").write_text(handler_code)
    monkeypatch.setenv("PYTHONPATH", str(procs.dir))  # the pool's workers import it
    pool = procs.pool(workers=1, handler="doc_arrays:Embedder")
    with Client(pool.address, timeout=30) as c:
        names = {"c": c, "np": np}
        exec(call_code, names)
    out = names["out"]
    assert isinstance(out["emb"], torch.Tensor) and out["emb"].device.type == "cpu"
    assert out["emb"].dtype == torch.float32 and tuple(out["emb"].shape) == (8, 16)
    torch.manual_seed(0)
    assert torch.allclose(out["emb"], torch.ones(8, 64) @ torch.randn(64, 16), atol=1e-4)
    assert type(out["norms"]) is np.ndarray and out["norms"].dtype == np.float32
    assert out["norms"].shape == (8,) and np.allclose(out["norms"], 8.0)


def _segments_of(pids) -> list[str]:
    return [n for n in shm.owned_segments() if int(n.split("-")[2]) in pids]


def test_killed_worker_leaves_no_segment(procs):
    pool = procs.pool(workers=1, handler="tests.handlers:Tensors")
    a = random_numpy("float32", (1024, 1024))
    with Client(pool.address, timeout=30) as c:
        stream = c.stream("hold", {"a": a, "seconds": 60})
        held = next(stream)  # the worker lent a segment for it and now sleeps
        pid = pool.status()["workers"][0]["pid"]
        assert _segments_of({pid})
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(WorkerCrashedError):
            next(stream)
        pool.wait_for(lambda st: st["workers"][0]["state"] == "ready"
                      and st["workers"][0]["pid"] != pid, what="a replacement")
        assert _segments_of({pid}) == []
        assert same(a, held)  # what was received stays valid after its owner died
        assert same(a, c.call("echo", a))  # and the replacement serves arrays
        mine = c._pool.names()
    assert mine and not [n for n in mine if os.path.exists(f"/dev/shm/{n}")]


def test_client_closed_mid_request_leaves_no_segment(procs):
    pool = procs.pool(workers=1, handler="tests.handlers:Tensors")
    a = random_numpy("float32", (1024, 1024))
    c = Client(pool.address, timeout=30)
    futs = [c.submit("sleep", {"seconds": 0.3, "a": a}) for _ in range(3)]
    mine = c._pool.names()
    assert len(mine) == 3
    time.sleep(0.1)  # the first is running on the worker, the others are queued
    c.close()
    assert not [n for n in mine if os.path.exists(f"/dev/shm/{n}")]
    for f in futs:
        with pytest.raises(Exception, match="closed"):
            f.result(5)
    pid = pool.status()["workers"][0]["pid"]
    with Client(pool.address, timeout=30) as c2:  # the worker got over the missing segments
        assert same(a, c2.call("echo", a))
    pool.stop()
    assert _segments_of({pid}) == []  # a worker that stops unlinks what it owns


def test_a_take_waits_out_the_owners_momentary_lock(segs):
    """The owner holds EX on a segment for moments (checking it for reuse, bumping its
    generation); a receiver arriving then must wait, not call the handle stale."""
    import fcntl
    import threading

    pool, mapper = segs
    lease = pool.lend(4096)  # a reply's segment (no tag)
    lease.data[:] = b"\x07" * 4096
    name, gen = lease.handle
    fd = os.open(f"/dev/shm/{name}", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as the owner's probe does, from another open file
        threading.Timer(0.01, fcntl.flock, (fd, fcntl.LOCK_UN)).start()
        got = mapper.take(name, gen, 4096)
        assert bytes(got[:4]) == b"\x07" * 4
    finally:
        os.close(fd)
    # An untaken reply's segment is not even probed: lending again makes a new one.
    other = pool.lend(4096)
    assert other.handle[0] != name or other.handle[1] == gen + 1


def test_concurrent_shared_memory_round_trips_stay_exact(procs):
    """Replies in flight on both workers while the client takes earlier ones."""
    import threading

    pool = procs.pool("--max-inflight", "64", handler="workerpool.handlers:Echo", workers=2)
    rng = np.random.default_rng(7)
    arrays = [rng.integers(0, 255, 1 << 20, dtype=np.uint8) for _ in range(8)]
    room = threading.Semaphore(4)
    failures: list = []

    def check(f, a):
        try:
            if not np.array_equal(f.result(), a):
                failures.append("wrong bytes")
        except Exception as exc:
            failures.append(repr(exc))
        room.release()

    with Client(pool.address, timeout=30) as c:
        for i in range(1500):
            room.acquire()
            a = arrays[i % len(arrays)]
            c.submit("echo", a).add_done_callback(lambda f, a=a: check(f, a))
        for _ in range(4):
            room.acquire()
    assert failures == []


def test_sweep_unlinks_only_segments_of_dead_owners():
    import subprocess
    import sys as _sys

    child = subprocess.Popen([_sys.executable, "-c", "pass"])
    child.wait()  # a pid that no longer runs (reuse within this test is not a concern)
    dead = f"wp-{shm.PIDNS}-{child.pid}-{'a' * 16}"
    mine = f"wp-{shm.PIDNS}-{os.getpid()}-{'b' * 16}"
    for name in (dead, mine):
        with open(f"/dev/shm/{name}", "wb") as f:
            f.write(b"\0" * 64)
    try:
        assert shm.sweep_dead_owners() >= 1
        assert not os.path.exists(f"/dev/shm/{dead}")
        assert os.path.exists(f"/dev/shm/{mine}")  # its owner runs: left alone
    finally:
        for name in (dead, mine):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"/dev/shm/{name}")
