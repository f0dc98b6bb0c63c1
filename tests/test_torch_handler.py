"""The built-in TorchMLP handler on the CPU (runs everywhere), and how the built-in GPU
handlers fail their setup where they cannot run. tests/test_gpu_handlers.py runs them on a
GPU."""

from __future__ import annotations

import math
import random

import pytest

from workerpool import Client, HandlerError
from workerpool.context import WorkerContext

torch = pytest.importorskip("torch", reason="torch is not installed")

from workerpool.handlers.torch_mlp import TorchMLP  # noqa: E402

SMALL = {"in_features": 8, "hidden": 32, "out_features": 4, "layers": 3, "threads": 1}
MLP = "workerpool.handlers.torch_mlp:TorchMLP"


def _options_toml(options: dict) -> str:
    return "{ " + ", ".join(f"{k} = {v!r}" if not isinstance(v, str) else f'{k} = "{v}"'
                            for k, v in options.items()) + " }"


def _mlp_pool(procs, workers=1, max_inflight=32, options=SMALL, policy="round-robin",
              devices="cpu"):
    return procs.pool_from_config(
        f'[[services]]\nname = "default"\nhandler = "{MLP}"\nworkers = {workers}\n'
        f'max_inflight = {max_inflight}\npolicy = "{policy}"\ndevices = "{devices}"\n'
        f"options = {_options_toml(options)}\n")


def _local(**options) -> TorchMLP:
    ctx = WorkerContext(slot="test/0", service="test", incarnation=1, device="cpu",
                        physical_device="cpu", options=options)
    h = TorchMLP()
    h.context = ctx
    h.setup(ctx)
    return h


def _close(a, b, tol=1e-5) -> bool:
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(
            _close(x, y, tol) for x, y in zip(a, b, strict=True))
    return math.isclose(a, b, rel_tol=tol, abs_tol=tol)


def _inputs(n, width=8, seed=1):
    """Mixed ranks and row counts: vectors and 1..5-row matrices."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        if i % 3 == 0:
            out.append([rng.uniform(-2, 2) for _ in range(width)])
        else:
            out.append([[rng.uniform(-2, 2) for _ in range(width)] for _ in range(i % 5 + 1)])
    return out


def test_shapes_determinism_and_same_model_in_every_worker(procs):
    pool = _mlp_pool(procs, workers=2)
    ref = _local(**SMALL)
    vec, mat = [0.5] * 8, [[0.1 * i] * 8 for i in range(3)]
    with Client(pool.address, timeout=60) as c:
        infos = [c.call("info") for _ in range(2)]
        assert {i["slot"] for i in infos} == {"default/0", "default/1"}
        assert infos[0]["parameters"] == 8 * 32 + 32 + 32 * 32 + 32 + 32 * 4 + 4
        assert infos[0]["device"] == "cpu" and infos[0]["threads"] == 1
        outs = [c.call("infer", vec) for _ in range(4)]  # round-robin: both workers, twice
        assert len(outs[0]) == 4 and all(isinstance(v, float) for v in outs[0])
        assert all(o == outs[0] for o in outs)  # bit-identical from either worker
        assert _close(outs[0], ref.infer(vec))
        m = c.call("infer", mat)
        assert [len(r) for r in m] == [4, 4, 4]
        assert _close(m, ref.infer(mat))
        assert _close(c.call("infer_batch", mat), m)
    other = _local(**{**SMALL, "seed": 1})
    assert not _close(other.infer(vec), ref.infer(vec), tol=1e-3)  # the seed is the model


def test_batched_results_equal_unbatched_for_mixed_inputs_in_process():
    h = _local(**SMALL)
    inputs = _inputs(20)
    bad = [[1.0] * 7, "not numbers", [[1.0] * 8, [1.0] * 7], [], [[[1.0] * 8]]]
    batch = h.infer_batch([*inputs[:10], *bad, *inputs[10:]])
    assert len(batch) == 25
    got = batch[:10] + batch[15:]
    for x, y in zip(inputs, got, strict=True):
        assert _close(y, h.infer(x))
        assert (len(y) == 4) if not isinstance(x[0], list) else [len(r) for r in y] == [4] * len(x)
    for err in batch[10:15]:
        assert isinstance(err, ValueError)
    assert "expected [8] or [rows, 8]" in str(batch[10])
    assert "not a numeric array" in str(batch[11])


def test_batched_and_unbatched_through_the_pool(procs):
    pool = _mlp_pool(procs, workers=1)
    ref = _local(**SMALL)
    inputs = _inputs(40, seed=2)
    with Client(pool.address, timeout=60) as c:
        batched = [c.submit("infer_batch", x) for x in inputs]
        bad = c.submit("infer_batch", [1.0, 2.0])
        plain = [c.submit("infer", x) for x in inputs]
        for x, fb, fp in zip(inputs, batched, plain, strict=True):
            assert _close(fb.result(), fp.result())
            assert _close(fb.result(), ref.infer(x))
        with pytest.raises(HandlerError, match=r"shape \(2,\): expected \[8\]") as info:
            bad.result()
        assert info.value.remote_type == "ValueError"
        with pytest.raises(HandlerError, match="max_rows"):
            c.call("infer", [[0.0] * 8] * 5000)
        stats = c.call("info")["stats"]
        assert stats["batched_requests"] == 41 and stats["batches"] >= 1


def test_builtin_handlers_fail_setup_clearly_where_they_cannot_run(procs):
    pool = procs.pool_from_config(
        '[[services]]\nname = "good"\nhandler = "workerpool.handlers:Echo"\n'
        f'[[services]]\nname = "typo"\nhandler = "{MLP}"\n'
        'options = { in_feature = 8 }\n'
        '[[services]]\nname = "cupy"\nhandler = "workerpool.handlers.cupy_ops:CupyOps"\n'
        'devices = "cpu"\n')
    # The supervisor's "failed" and the worker's traceback travel on different sockets.
    st = pool.wait_for(lambda s: sum(w["state"] == "failed" and "Error" in (w["last_error"] or "")
                                     for w in s["workers"]) == 2,
                       what="two failed slots with their tracebacks")
    errors = {w["service"]: w["last_error"] for w in st["workers"]}
    assert "in_feature" in errors["typo"] and "Extra inputs are not permitted" in errors["typo"]
    assert "CupyOps needs an NVIDIA GPU" in errors["cupy"] and "'cpu'" in errors["cupy"]
    with Client(pool.address, timeout=10) as c:
        assert c.call("echo", 1, service="good") == 1


def test_cupy_ops_without_cupy_says_so(monkeypatch):
    import sys

    from workerpool.handlers.cupy_ops import CupyOps

    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy raises ImportError
    ctx = WorkerContext(slot="gpu/0", service="gpu", incarnation=1, device="cuda:0",
                        physical_device="0")
    with pytest.raises(RuntimeError, match=r"CupyOps needs CuPy: pip install 'workerpool\[cupy\]'"):
        CupyOps().setup(ctx)


def test_torch_mlp_on_a_gpu_device_without_cuda_says_so():
    if torch.cuda.is_available():
        pytest.skip("this torch sees a GPU: tests/test_gpu_handlers.py covers it")
    ctx = WorkerContext(slot="gpu/0", service="gpu", incarnation=1, device="cuda:0",
                        physical_device="0", options=SMALL)
    with pytest.raises(RuntimeError, match="sees no CUDA device"):
        TorchMLP().setup(ctx)


def test_the_example_handler_of_docs_handlers_md(procs):
    from examples.classifier import save_example_weights

    weights = procs.dir / "classifier.pt"
    save_example_weights(str(weights))
    pool = procs.pool_from_config(
        '[[services]]\nname = "default"\nhandler = "examples.classifier:Classifier"\n'
        f'max_inflight = 32\noptions = {{ weights = "{weights}" }}\n')
    rows = [[0.1, 0.2, 0.3, 0.4], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 5.0, -1.0]]
    labels = {"setosa", "versicolor", "virginica"}
    with Client(pool.address, timeout=30) as c:
        whole = c.call("predict", rows)
        assert len(whole) == 3 and set(whole) <= labels
        futs = [c.submit("predict_batch", r) for r in rows]
        bad = c.submit("predict_batch", [1.0, 2.0])
        assert [f.result() for f in futs] == [[label] for label in whole]
        with pytest.raises(HandlerError, match=r"expected rows of 4 numbers, got shape \(1, 2\)"):
            bad.result()
        assert list(c.stream("scan", rows)) == whole


def test_replies_come_back_as_the_kind_of_array_that_was_sent(procs):
    import numpy as np
    import torch

    pool = _mlp_pool(procs, workers=1)
    ref = _local(**SMALL)
    rows = _inputs(2, seed=5)[1]  # a 2-row matrix, as lists
    with Client(pool.address, timeout=60) as c:
        as_list = c.call("infer_batch", rows)
        as_numpy = c.call("infer_batch", np.asarray(rows, dtype=np.float32))
        as_torch = c.call("infer", torch.tensor(rows, dtype=torch.float32))
    assert isinstance(as_list, list) and _close(as_list, ref.infer(rows))
    assert isinstance(as_numpy, np.ndarray) and as_numpy.dtype == np.float32
    assert isinstance(as_torch, torch.Tensor) and as_torch.dtype == torch.float32
    assert as_numpy.shape == tuple(as_torch.shape) == (2, SMALL["out_features"])
    assert _close(as_numpy.tolist(), as_list) and _close(as_torch.tolist(), as_list)
