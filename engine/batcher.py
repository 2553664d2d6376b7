"""The dynamic batcher: one queue per loaded model version, served by one or more instances.

The engine's loop appends requests (``submit``) and, once per burst of messages, wakes an idle
instance (``wake``): a burst of requests costs one thread wake-up, not one each. Each instance (a
thread with its own preallocated batch) takes up to ``batch_limit`` requests,
waiting at most max_queue_delay_ms after the first and only while another instance runs (see
``_collect``); drops requests past their deadline; copies each
slot into its batch (one memcpy per image); runs the session once; decodes with the model's head;
hands one reply per request back. Several instances run the one shared session concurrently (ONNX
Runtime allows concurrent ``run`` calls and releases the GIL): on a CPU box, one single-threaded
instance per core beats one instance with a thread per core, because much of a detector (its NMS
loop) does not parallelise inside the graph.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from loguru import logger

from engine import heads, metrics
from engine.models import LoadedModel
from ipc.errors import QueueFull
from ipc.messages import Error, Infer, Result


@dataclass
class Job:
    identity: bytes
    msg: Infer
    pixels: np.ndarray  # a read-only view of the worker's ring slot
    arrived: float  # perf_counter() when the engine received it


# Hands a batch's answers over together, so that the engine sends each worker one message for them.
Answer = tuple[Job, Result | Error]
Reply = Callable[[list[Answer]], None]


class Batcher:
    def __init__(self, model: LoadedModel, reply: Reply, instances: int = 1) -> None:
        self.model = model
        self._reply = reply
        cfg = model.config
        self._limit = cfg.queue_limit
        self._jobs: deque[Job] = deque()  # appended by the engine's loop, taken under _ready
        self._ready = threading.Condition(threading.Lock())
        self._waiting = 0  # instances waiting on _ready (under its lock)
        self._busy = 0  # instances running a batch now (under _ready's lock; read without it as a hint)
        self._halt = threading.Event()
        self.instances = max(1, instances)
        self._default = heads.Params(cfg.confidence, cfg.max_detections)
        self._threads = [
            threading.Thread(
                target=self._serve,
                args=(np.empty((model.batch_limit, *model.input_shape), dtype=np.uint8),),
                name=f"batcher-{cfg.name}-{model.version}-{k}",
                daemon=True,
            )
            for k in range(self.instances)
        ]
        labels = (model.config.name, str(model.version))
        self._m_infer = metrics.INFERENCE.labels(*labels)
        self._m_batch = metrics.BATCH_SIZE.labels(*labels)
        self._m_images = metrics.IMAGES.labels(*labels)
        self._m_execs = metrics.EXECUTIONS.labels(*labels)
        self._m_depth = metrics.QUEUE_DEPTH.labels(*labels)

    @property
    def depth(self) -> int:
        return len(self._jobs)

    def submit(self, job: Job) -> None:
        """Queue a job; it waits for ``wake`` (or an instance that finishes a batch) to be taken."""
        if len(self._jobs) >= self._limit:
            raise QueueFull(f"queue of {self.model.config.name} is full ({self._limit})")
        self._jobs.append(job)

    def wake(self) -> None:
        """After a burst of submits: wake as many waiting instances as the queue can keep busy.

        The depth gauge is written here and when a batch is taken: once per burst, not per request.
        """
        self._m_depth.set(len(self._jobs))
        with self._ready:
            if self._waiting and self._jobs:
                self._ready.notify(-(-len(self._jobs) // self.model.batch_limit))

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._halt.set()

    def join(self, timeout: float) -> None:
        for thread in self._threads:
            thread.join(timeout)

    def dead(self) -> list[str]:
        """Names of instance threads that ended while the batcher was still meant to serve."""
        if self._halt.is_set():
            return []
        return [t.name for t in self._threads if t.ident is not None and not t.is_alive()]

    def _serve(self, batch: np.ndarray) -> None:
        try:
            while not self._halt.is_set():
                jobs = self._collect()
                if jobs:
                    try:
                        self._guarded(jobs, batch)
                    finally:
                        with self._ready:
                            self._busy -= 1
                            if self._waiting:  # a batch waiting for company need wait no longer
                                self._ready.notify_all()
        except BaseException:
            # Reached only by a fault outside _guarded (or a BaseException): the engine's loop sees
            # the dead thread through dead() and exits to be restarted rather than serve with a hole.
            logger.exception("batcher thread {} died", threading.current_thread().name)

    def _guarded(self, jobs: list[Job], batch: np.ndarray) -> None:
        """Run one batch; whatever fails, every job gets exactly one answer and its slot back."""
        answered: set[tuple[bytes, int, int]] = set()
        try:
            self._execute(jobs, batch, answered)
        except Exception as exc:
            logger.exception("model {} failed while handling a batch of {}", self.model.config.name, len(jobs))
            for job in jobs:
                if _key(job) not in answered:
                    self._fail(job, "internal", f"the engine failed on this batch: {type(exc).__name__}: {exc}")

    def _collect(self) -> list[Job]:
        """The next batch: the first job, everything already queued, and company only when it pays.

        A batch waits up to max_queue_delay_ms for more requests only when company is coming: while
        another instance of this model runs (the wait overlaps useful work, and the next arrivals
        queue behind that run), or when the batch holds an image of a multi-image request whose
        other images are on their way (``Infer.grouped``); or always, where model.toml says
        ``wait_alone = true`` (Triton's dynamic batcher). A request that finds every instance idle runs at once,
        with whatever is queued beside it: a lone request never sits out the delay (issue 15), and
        under load the batch fills by itself while the previous one runs (Triton's dynamic batcher
        waits the full delay; this is closer to continuous batching).
        """
        limit = self.model.batch_limit
        with self._ready:
            if not self._jobs:
                self._wait(0.1)
            jobs = self._take(limit)
            delay = self.model.config.max_queue_delay_ms / 1000
            if jobs and len(jobs) < limit and delay > 0 and self._company_coming(jobs):
                until = time.perf_counter() + delay
                while len(jobs) < limit and self._company_coming(jobs):
                    if (remaining := until - time.perf_counter()) <= 0:
                        break
                    self._wait(remaining)
                    jobs += self._take(limit - len(jobs))
            self._busy += bool(jobs)
        self._m_depth.set(len(self._jobs))
        return jobs

    def _wait(self, timeout: float) -> None:
        """Wait on _ready (its lock held) for a wake, a finished batch or the timeout."""
        self._waiting += 1
        try:
            self._ready.wait(timeout)
        finally:
            self._waiting -= 1

    def _take(self, n: int) -> list[Job]:
        jobs = self._jobs
        return [jobs.popleft() for _ in range(min(n, len(jobs)))]

    def _company_coming(self, jobs: list[Job]) -> bool:
        return self.model.config.wait_alone or self._busy > 0 or any(j.msg.grouped for j in jobs)

    def _execute(self, jobs: list[Job], batch: np.ndarray, answered: set[tuple[bytes, int, int]]) -> None:
        now = time.time()
        live = []
        for job in jobs:
            if job.msg.deadline < now:
                answered.add(_key(job))
                self._fail(job, "timeout", "deadline passed while queued")
            else:
                live.append(job)
        if not live:
            return
        started = time.perf_counter()
        n = len(live)
        np.stack([job.pixels for job in live], out=batch[:n])  # one call: a copyto per image cost more on small ones
        cfg = self.model.config
        params = [_params(j.msg, self._default) for j in live]
        if cfg.task == "raw":
            live = [_with_raw(j) for j in live]
        outputs = self.model.session.run(batch[:n])
        results = self._decode(outputs, params)
        inference_ms = (time.perf_counter() - started) * 1000
        self._m_infer.observe(inference_ms / 1000)
        self._m_batch.observe(n)
        self._m_images.inc(n)
        self._m_execs.inc()
        tensors = heads.raw(outputs, n) if any(j.msg.raw for j in live) else None
        answers: list[Answer] = []
        for i, (job, result) in enumerate(zip(live, results, strict=True)):
            if tensors is not None and job.msg.raw:
                result = {**result, "tensors": tensors[i]}
            queue_ms = (started - job.arrived) * 1000
            msg = Result(
                req_id=job.msg.req_id,
                slot=job.msg.slot,
                generation=job.msg.generation,
                model=cfg.name,
                version=self.model.version,
                batch_size=n,
                queue_ms=queue_ms,
                inference_ms=inference_ms,
                **result,
            )
            answers.append((job, msg))
        self._reply(answers)
        answered.update(_key(job) for job, _ in answers)
        # One line per batch, not per image (a line costs more than the engine's own work per image
        # on a light model); its request ids make every request traceable from the worker's line.
        logger.bind(request_id=",".join(j.msg.req_id for j in live)).info(
            "infer {}/{} batch={} queue={:.2f}ms inference={:.2f}ms",
            cfg.name,
            self.model.version,
            n,
            (started - live[0].arrived) * 1000,
            inference_ms,
        )

    def _decode(self, outputs: dict[str, np.ndarray], params: list[heads.Params]) -> list[dict]:
        task = self.model.config.task
        if task == "ssd":
            return [{"detections": d} for d in heads.ssd(outputs, self.model.config, params)]
        if task == "yolo":
            return [{"detections": d} for d in heads.yolo(outputs, self.model.config, params)]
        if task == "classify":
            return [{"classes": c} for c in heads.classify(outputs, self.model.config, params)]
        return [{} for _ in params]  # raw: the tensors are attached for every request below

    def _fail(self, job: Job, reason: str, detail: str) -> None:
        metrics.ENGINE_ERRORS.labels(reason).inc()
        logger.bind(request_id=job.msg.req_id).warning("request failed: {}: {}", reason, detail)
        self._reply([(job, Error(job.msg.req_id, job.msg.slot, job.msg.generation, reason, detail))])


def _params(msg: Infer, default: heads.Params) -> heads.Params:
    """The request's own floor and cap, where it has them (most requests take the model's)."""
    if msg.confidence < 0 and not msg.max_detections:
        return default
    return heads.Params(
        confidence=msg.confidence if msg.confidence >= 0 else default.confidence,
        max_detections=msg.max_detections or default.max_detections,
    )


def _key(job: Job) -> tuple[bytes, int, int]:
    return job.identity, job.msg.slot, job.msg.generation


def _with_raw(job: Job) -> Job:
    """A raw-head model always answers with its tensors."""
    if job.msg.raw:
        return job
    import msgspec

    return Job(job.identity, msgspec.structs.replace(job.msg, raw=True), job.pixels, job.arrived)
