"""Models change while the engine serves: load beside, warm up, switch, drain, unload.

Three threads share the work. The engine's IO loop owns every table requests are routed with
(``engine.batchers``, ``engine.latest``, ``engine.failed``) and changes them only in ``tick``; the
loader thread creates sessions, warms them up and frees retired ones (seconds of CPU that must not
stall the IO loop); in poll mode the watcher thread scans the repository. They talk through two
queues.

A version that is replaced or unloaded stops being announced at once but is still served while
requests reach it (workers resolve "latest" before they learn the new model set) and until
``unload_grace_s`` has passed after the last of them; then its batcher stops and the loader frees
it. Versions that are no longer wanted are retired only once the wanted ones have all loaded or
failed, and only if one of them is ready: a broken new version fails alone, the old one serves on.
"""

from __future__ import annotations

import gc
import queue
import threading
import time
from typing import TYPE_CHECKING

import zmq
from loguru import logger

from engine import metrics
from engine.batcher import Batcher
from engine.control import LifecycleSettings
from engine.served import Counted, Event, Failed, Freed, Key, Loaded, Pending, Retiring, WantTask, trim
from engine.warmup import warm_up
from engine.watch import Fingerprint, Snapshot, Want, Watcher, snapshot
from ipc import messages as m

if TYPE_CHECKING:
    from engine.server import Engine

LOADING, READY, UNLOADING, UNAVAILABLE = "LOADING", "READY", "UNLOADING", "UNAVAILABLE"
FORCE_UNLOAD_S = 60.0  # a retired version whose requests never finish is stopped anyway


class Lifecycle:
    def __init__(self, engine: Engine, settings: LifecycleSettings) -> None:
        self.engine = engine
        self.settings = settings
        self.providers: list[str] = []
        self.wants: dict[str, dict[int, Want]] = {}
        self.errors: dict[str, str] = {}  # model (or model/version) -> why it cannot be served
        self.serving: dict[Key, Fingerprint] = {}
        self.loading: dict[Key, Fingerprint] = {}
        self.broken: dict[Key, tuple[Fingerprint, str]] = {}
        self.retiring: list[Retiring] = []
        self.freeing: set[Key] = set()
        self.unloaded: set[Key] = set()
        self.pending: list[Pending] = []
        self._events: queue.Queue[Event] = queue.Queue()
        self._tasks: queue.Queue[WantTask | Retiring | None] = queue.Queue()
        self._loader = threading.Thread(target=self._load_loop, name="model-loader", daemon=True)
        self._watcher: Watcher | None = None
        self._changed = False
        self._serving = False

    # ----------------------------------------------------------------- start and stop
    def initial_load(self, providers: list[str]) -> None:
        """What the repository asks for, loaded and warmed before the engine binds its socket."""
        self.providers = providers
        first = snapshot(self.engine.settings.repo, self.engine.settings.models or None)
        self.wants, self.errors = dict(first.wants), dict(first.errors)
        for name, why in self.errors.items():
            logger.error("model {} not loaded: {}", name, why)
        # On the loader thread, like every later load: one thread creates every session.
        self._loader.start()
        keys = [(name, v) for name in sorted(self.wants) for v in sorted(self.wants[name])]
        for key in keys:
            self.loading[key] = self.wants[key[0]][key[1]].fingerprint
            self._tasks.put(WantTask(key, self.wants[key[0]][key[1]]))
        for _ in keys:
            event = self._events.get()
            assert isinstance(event, (Loaded, Failed))
            self._apply(event)
        self._serving = True
        self._publish_tables()
        if self.settings.control == "poll":
            self._watcher = Watcher(
                self.engine.settings.repo,
                self.engine.settings.models or None,
                self.settings.poll_interval_s,
                first,
                self._events.put,
            )
            self._watcher.start()

    def stop(self) -> list[Batcher]:
        """Stop the threads; the batchers still to be stopped (retired ones, here)."""
        if self._watcher is not None:
            self._watcher.stop()
        self._tasks.put(None)
        self._loader.join(timeout=10)
        return [r.batcher for r in self.retiring]

    def route(self, key: Key) -> Batcher | None:
        """The batcher a request for ``key`` goes to: the served one, else one being retired."""
        served = self.engine.batchers.get(key)
        if served is not None:
            return served
        for r in reversed(self.retiring):
            if r.key == key:
                return r.batcher
        return None

    # ----------------------------------------------------------------- the IO loop's part
    def tick(self, router: zmq.Socket) -> None:
        while True:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                break
            if isinstance(event, Snapshot):
                self.wants, self.errors = dict(event.wants), dict(event.errors)
                self._changed = True
            else:
                self._apply(event)
        self._reconcile()
        self._retire_drained(time.monotonic())
        if self._changed:
            self._changed = False
            self._publish_tables()
            # Every model, with the slot size they need: a worker whose ring is smaller serves the
            # models that fit and registers a bigger ring for the others (frontend/rings.py).
            payload = m.encode(self.engine.ready_message(True))
            for identity, worker in list(self.engine.workers.items()):
                if worker.ring is not None:
                    self.engine._send(router, identity, payload)
        self._answer(router)

    def control(self, router: zmq.Socket, identity: bytes, msg: m.Control) -> None:
        def refuse(why: str) -> None:
            self.engine._send(router, identity, m.encode(m.ControlReply(msg.req_id, False, why, self.states())))

        if msg.action == "index":
            self.engine._send(router, identity, m.encode(m.ControlReply(msg.req_id, True, "", self.index())))
            return
        if msg.action not in ("load", "unload"):
            return refuse(f"unknown action {msg.action!r}")
        mode = self.settings.control
        if mode != "explicit":
            return refuse(
                f"explicit model load / unload is not allowed: the model control mode is {mode!r} "
                "(start with RINGSERVE_MODEL_CONTROL=explicit)"
            )
        if msg.action == "unload":
            self.wants[msg.model] = {}
            self.pending.append(Pending(identity, msg))
            self._changed = True
            return None
        repo = self.engine.settings.repo
        if msg.model.startswith(".") or not (repo / msg.model).is_dir():
            return refuse(f"model {msg.model!r} is not in the repository {repo}")
        found = snapshot(repo, [msg.model])
        if msg.model not in found.wants:
            return refuse(found.errors.get(msg.model) or f"model {msg.model!r} is not in the repository")
        self.wants[msg.model] = found.wants[msg.model]
        self.errors = {k: v for k, v in self.errors.items() if k != msg.model and not k.startswith(f"{msg.model}/")}
        self.errors.update(found.errors)
        for v in self.wants[msg.model]:
            self.broken.pop((msg.model, v), None)  # asked again: try again
        self.pending.append(Pending(identity, msg))
        self._changed = True
        return None

    # ----------------------------------------------------------------- state
    def states(self) -> list[m.ModelState]:
        out: dict[Key, m.ModelState] = {}
        for key in self.unloaded:
            out[key] = m.ModelState(*key, UNAVAILABLE, "unloaded")
        for key, (_fp, why) in self.broken.items():
            out[key] = m.ModelState(*key, UNAVAILABLE, why)
        for r in self.retiring:
            out[r.key] = m.ModelState(*r.key, UNLOADING)
        for key in self.freeing:
            out[key] = m.ModelState(*key, UNLOADING)
        for key in self.loading:
            reload = "reloading; the loaded files serve meanwhile" if key in self.serving else ""
            out[key] = m.ModelState(*key, READY if reload else LOADING, reload)
        for key in self.serving:
            if key not in self.loading:
                why = self.broken[key][1] if key in self.broken else ""
                out[key] = m.ModelState(*key, READY, f"new files failed, the loaded ones serve: {why}" if why else "")
        return [out[k] for k in sorted(out)]

    def index(self) -> list[m.ModelState]:
        """states() plus the repository's models that nothing was asked of (explicit mode)."""
        known = {s.name for s in self.states()}
        found = snapshot(self.engine.settings.repo, None)
        extra = [
            m.ModelState(name, 0, UNAVAILABLE, found.errors.get(name, "not loaded"))
            for name in sorted(set(found.wants) | {k for k in found.errors if "/" not in k})
            if name not in known and not name.startswith("<")
        ]
        return sorted(self.states() + extra, key=lambda s: (s.name, s.version))

    def _publish_tables(self) -> None:
        e = self.engine
        latest: dict[str, int] = {}
        for name, version in e.batchers:
            latest[name] = max(version, latest.get(name, 0))
        e.latest = latest
        failed = dict(self.errors)
        failed.update({f"{n}/{v}": why for (n, v), (_fp, why) in self.broken.items()})
        e.failed = failed

    # ----------------------------------------------------------------- decisions
    def _reconcile(self) -> None:
        names = set(self.wants) | {n for n, _ in self.engine.batchers} | {n for n, _ in self.loading}
        for name in names:
            wanted = self.wants.get(name, {})
            for version, want in wanted.items():
                key = (name, version)
                if key in self.loading or self.serving.get(key) == want.fingerprint:
                    continue
                if key in self.broken and self.broken[key][0] == want.fingerprint:
                    continue  # the same broken files: not again until they change
                self.loading[key] = want.fingerprint
                self.unloaded.discard(key)
                self._tasks.put(WantTask(key, want))
                self._changed = True
            extra = [k for k in self.engine.batchers if k[0] == name and k[1] not in wanted]
            settled = not any((name, v) in self.loading for v in wanted)
            ready = any((name, v) in self.engine.batchers for v in wanted)
            if extra and (not wanted or (settled and ready)):
                for key in extra:
                    self._retire(key)
            for key in [k for k in self.broken if k[0] == name and k[1] not in wanted]:
                del self.broken[key]  # its files are gone: nothing to report any more
                self._changed = True

    def _retire(self, key: Key) -> None:
        batcher = self.engine.batchers.pop(key)
        assert isinstance(batcher, Counted)
        self.serving.pop(key, None)
        self.retiring.append(Retiring(key, batcher, time.monotonic()))
        logger.info("{}/{} no longer announced; unloading once its requests are done", *key)
        self._changed = True

    def _retire_drained(self, now: float) -> None:
        grace = self.settings.unload_grace_s
        for r in list(self.retiring):
            quiet = r.batcher.inflight == 0 and now - max(r.since, r.batcher.last_submit) >= grace
            if not quiet and now - r.since < FORCE_UNLOAD_S:
                continue
            if not quiet:
                logger.warning("{}/{}: {} requests still unanswered; unloading anyway", *r.key, r.batcher.inflight)
            self.retiring.remove(r)
            r.batcher.stop()
            self.freeing.add(r.key)
            self._tasks.put(r)
            self._changed = True

    def _apply(self, event: Loaded | Failed | Freed) -> None:
        self._changed = True
        if isinstance(event, Freed):
            self.freeing.discard(event.key)
            if event.key not in self.serving and event.key not in self.loading:
                self.unloaded.add(event.key)
            return
        key = event.key
        self.loading.pop(key, None)
        if isinstance(event, Failed):
            self.broken[key] = (event.fingerprint, event.reason)
            logger.error("model {}/{} not loaded: {}", *key, event.reason)
            return
        self.broken.pop(key, None)
        if key[1] not in self.wants.get(key[0], {}):
            # No longer wanted while it loaded: free it without ever serving it.
            self.freeing.add(key)
            self._tasks.put(Retiring(key, event.batcher, time.monotonic()))
            return
        if key in self.engine.batchers:
            self._retire(key)  # the same version with new files: the old session drains
        self.engine.batchers[key] = event.batcher
        self.serving[key] = event.fingerprint
        self.unloaded.discard(key)
        self.engine.providers = event.batcher.model.session.providers
        metrics.LOAD_TIME.labels(key[0], str(key[1])).set(event.batcher.model.load_seconds)
        if self._serving:  # the batchers of the initial load start with the engine
            event.batcher.start()
        logger.info("{}/{} ready", *key)

    def _answer(self, router: zmq.Socket) -> None:
        for p in list(self.pending):
            name = p.msg.model
            busy = any(k[0] == name for k in self.loading)
            if p.msg.action == "unload":  # answered once the memory is back
                busy = busy or any(k[0] == name for k in [*self.engine.batchers, *self.freeing])
                busy = busy or any(r.key[0] == name for r in self.retiring)
            if busy:
                continue
            self.pending.remove(p)
            failures = [f"{n}/{v}: {why}" for (n, v), (_fp, why) in self.broken.items() if n == name]
            failures += [f"{k}: {why}" for k, why in self.errors.items() if k == name or k.startswith(f"{name}/")]
            ok = not failures
            detail = "; ".join(failures) if failures else f"{p.msg.action}ed {name}"
            reply = m.ControlReply(p.msg.req_id, ok, detail, [s for s in self.states() if s.name == name])
            self.engine._send(router, p.identity, m.encode(reply))

    # ----------------------------------------------------------------- the loader thread
    def _load(self, key: Key, want: Want) -> Loaded | Failed:
        try:
            loaded, instances = self.engine._load_version(want.config, key[1], self.providers)
            warm_up(loaded)
            return Loaded(key, want.fingerprint, Counted(loaded, self.engine._reply_from_batcher, instances))
        except Exception as exc:
            return Failed(key, want.fingerprint, f"{type(exc).__name__}: {exc}" if not str(exc) else str(exc))

    def _load_loop(self) -> None:
        while True:
            task = self._tasks.get()
            if task is None:
                return
            try:
                if isinstance(task, WantTask):
                    self._events.put(self._load(task.key, task.want))
                else:
                    self._free(task)
            except Exception:  # the loader must outlive any one model
                logger.exception("model loader failed on {}", task)
            task = None

    def _free(self, retired: Retiring) -> None:
        key, batcher = retired.key, retired.batcher
        batcher.stop()
        batcher.join(timeout=10)
        retired.batcher = None  # type: ignore[assignment]
        del batcher
        gc.collect()
        trim()
        logger.info("{}/{} unloaded", *key)
        self._events.put(Freed(key))
