"""A model handler, written the way docs/handlers.md recommends: load in setup(), warm up,
run on ctx.device, batch, stream, and fail with errors that mean something to the caller.

Run it (from the repository root)::

    python examples/classifier.py save /tmp/classifier.pt    # example weights
    PYTHONPATH=. workerpool up --config examples/classifier.toml
    workerpool call predict '[[0.1, 0.2, 0.3, 0.4], [1, 0, 0, 0]]'
    workerpool call predict_batch '[0.1, 0.2, 0.3, 0.4]'
    workerpool call scan '[[0.1, 0.2, 0.3, 0.4], [1, 0, 0, 0]]'
"""

from __future__ import annotations

import sys
from typing import Any

from workerpool import Handler, WorkerContext, batched

FEATURES, CLASSES = 4, 3
LABELS = ("setosa", "versicolor", "virginica")


def build_model(torch: Any) -> Any:
    return torch.nn.Sequential(torch.nn.Linear(FEATURES, 16), torch.nn.ReLU(),
                               torch.nn.Linear(16, CLASSES))


class Classifier(Handler):
    """Classifies rows of 4 features into 3 labels."""

    def setup(self, ctx: WorkerContext) -> None:
        import torch  # only the worker imports the framework, never the router or client

        self.torch = torch
        self.device = torch.device(ctx.device)  # "cpu" or "cuda:0": the worker's own GPU
        weights = ctx.options.get("weights")
        if not weights:
            # Raising here marks the slot failed (not respawned in a loop), with this
            # message in `workerpool status`.
            raise ValueError("options.weights is not set: the path of a state_dict file")
        model = build_model(torch)
        # weights_only: a weights file must not be able to run code when it is loaded.
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        self.model = model.to(self.device).eval()
        # Warm-up: the first real request must not pay for allocation and kernel choice.
        with torch.inference_mode():
            self.model(torch.zeros(32, FEATURES, device=self.device))

    def _rows(self, payload: Any) -> Any:
        """A vector or a list of rows, as a [rows, FEATURES] tensor; ValueError otherwise."""
        x = self.torch.as_tensor(payload, dtype=self.torch.float32)
        if x.dim() == 1:
            x = x.unsqueeze(0)
        if x.dim() != 2 or x.shape[1] != FEATURES or x.shape[0] == 0:
            raise ValueError(f"expected rows of {FEATURES} numbers, got shape {tuple(x.shape)}")
        return x

    def _labels(self, logits: Any) -> list[str]:
        return [LABELS[i] for i in logits.argmax(dim=1).tolist()]

    def predict(self, payload: Any) -> list[str]:
        """One request: a label per row."""
        with self.torch.inference_mode():
            return self._labels(self.model(self._rows(payload).to(self.device)))

    @batched(max_batch_size=32, max_delay_ms=2)
    def predict_batch(self, payloads: list[Any]) -> list[Any]:
        """Many requests, one forward pass: rows of every valid request are concatenated;
        an invalid one gets its own error (the exception object in its place)."""
        out: list[Any] = [None] * len(payloads)
        rows, where = [], []
        for k, p in enumerate(payloads):
            try:
                rows.append(self._rows(p))
                where.append(k)
            except (TypeError, ValueError) as exc:
                out[k] = exc  # this caller gets HandlerError(ValueError: ...); others go on
        if rows:
            with self.torch.inference_mode():
                labels = self._labels(self.model(self.torch.cat(rows).to(self.device)))
            start = 0
            for k, r in zip(where, rows, strict=True):
                out[k] = labels[start:start + r.shape[0]]
                start += r.shape[0]
        return out

    def scan(self, payload: Any):
        """Streams a label per row as each is classified (a generator: one PARTIAL each)."""
        for row in self._rows(payload):
            with self.torch.inference_mode():
                yield self._labels(self.model(row.unsqueeze(0).to(self.device)))[0]


def save_example_weights(path: str, seed: int = 0) -> None:
    """Write a state_dict of seeded random weights, to try the handler without training."""
    import torch

    torch.manual_seed(seed)
    torch.save(build_model(torch).state_dict(), path)


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "save":
        sys.exit("usage: python examples/classifier.py save PATH")
    save_example_weights(sys.argv[2])
    print(f"wrote {sys.argv[2]}")
