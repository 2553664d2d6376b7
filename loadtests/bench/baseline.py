"""The common FastAPI pattern that targets (b) and (c) of the benchmark run.

What most tutorials and many services do: one app that holds an ONNX Runtime session in its own
process, reads the upload with ``UploadFile``, decodes and resizes it with Pillow and runs the model
in Starlette's thread pool (``run_in_threadpool``) so the event loop stays free. The answer has the
same shape as ringserve's (``detections`` or ``classes``) so the same client checks both.

    RINGSERVE_BENCH_MODEL_DIR=models/ssd-mobilenet-v2-coco RINGSERVE_BENCH_ORT=tuned \\
        uvicorn loadtests.bench.baseline:create_app --factory [--workers W]

``RINGSERVE_BENCH_ORT``: ``default`` (ONNX Runtime's own session options, as most code has them) or
``tuned`` (the engine's: ``RINGSERVE_BENCH_THREADS`` intra-op threads, default one per core, and
no spin-waiting). With ``--workers W`` every worker loads its own copy of the model.
"""

from __future__ import annotations

import io
import os
import sys
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from fastapi import FastAPI, File, UploadFile
from PIL import Image
from starlette.concurrency import run_in_threadpool

from loadtests.bench.prep import Prep

ROOT = Path(__file__).resolve().parents[2]


class Model:
    def __init__(self, directory: Path, mode: str, threads: int) -> None:
        cfg = tomllib.loads((directory / "model.toml").read_text())
        self.task = cfg["task"]
        self.prep = Prep.of(directory)
        self.outputs = cfg.get("outputs", {})
        self.confidence = cfg.get("thresholds", {}).get("confidence", 0.5)
        self.top_k = cfg.get("thresholds", {}).get("top_k", 5)
        self.labels = (directory / cfg["labels"]).read_text().splitlines() if "labels" in cfg else []
        if mode == "tuned":
            if str(ROOT) not in sys.path:
                sys.path.insert(0, str(ROOT))
            from engine.session import session_options

            options = session_options(threads or len(os.sched_getaffinity(0)))
        else:
            options = None
        self.session = ort.InferenceSession(
            str(directory / "1" / "model.onnx"), sess_options=options, providers=["CPUExecutionProvider"]
        )
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]

    def label(self, class_id: int) -> str:
        return self.labels[class_id] if 0 <= class_id < len(self.labels) else str(class_id)

    def predict(self, data: bytes) -> dict[str, Any]:
        image = Image.open(io.BytesIO(data)).convert("RGB")
        width, height = image.size
        batch = self.prep.pillow(image)
        outputs = dict(zip(self.output_names, self.session.run(None, {self.input_name: batch}), strict=True))
        if self.task == "ssd":
            return {"image": {"width": width, "height": height}, "detections": self._detections(outputs, width, height)}
        return {"image": {"width": width, "height": height}, "classes": self._classes(outputs)}

    def _detections(self, outputs: dict[str, np.ndarray], width: int, height: int) -> list[dict[str, Any]]:
        boxes = outputs[self.outputs.get("boxes", "boxes")][0]
        scores = outputs[self.outputs.get("scores", "scores")][0]
        classes = outputs[self.outputs.get("classes", "classes")][0].astype(int)
        count = int(outputs[self.outputs.get("count", "count")].reshape(-1)[0])
        found = []
        for k in range(min(count, len(scores))):
            if scores[k] < self.confidence:
                continue
            y1, x1, y2, x2 = boxes[k]
            found.append(
                {
                    "label": self.label(int(classes[k])),
                    "class_id": int(classes[k]),
                    "confidence": round(float(scores[k]), 4),
                    "bbox": [
                        round(float(x1) * width, 2),
                        round(float(y1) * height, 2),
                        round(float(x2) * width, 2),
                        round(float(y2) * height, 2),
                    ],
                }
            )
        return found

    def _classes(self, outputs: dict[str, np.ndarray]) -> list[dict[str, Any]]:
        logits = outputs[self.outputs.get("logits", self.output_names[0])][0].astype(np.float32)
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        top = np.argsort(-probs)[: self.top_k]
        return [{"label": self.label(int(c)), "class_id": int(c), "confidence": round(float(probs[c]), 4)} for c in top]


def create_app() -> FastAPI:
    model = Model(
        Path(os.environ["RINGSERVE_BENCH_MODEL_DIR"]),
        os.environ.get("RINGSERVE_BENCH_ORT", "default"),
        int(os.environ.get("RINGSERVE_BENCH_THREADS", "0")),
    )
    app = FastAPI(title="baseline")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "pid": os.getpid()}

    @app.post("/api/v1/predict")
    async def predict(image: UploadFile = File(...)) -> dict[str, Any]:  # noqa: B008 - FastAPI's idiom
        data = await image.read()
        return await run_in_threadpool(model.predict, data)

    return app
