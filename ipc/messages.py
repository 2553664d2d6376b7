"""Typed messages between frontend workers and the engine (msgspec msgpack, tagged, no pickle).

Pixels never travel in these messages: an ``Infer`` names a slot of the sender's shared-memory ring.
"""

from __future__ import annotations

import msgspec

_STRUCT = {"array_like": True, "omit_defaults": True, "gc": False, "frozen": True, "tag": True}


class InputSpec(msgspec.Struct, **_STRUCT):
    """What the frontend needs to prepare pixels for one model version."""

    height: int
    width: int
    resize: str  # stretch | letterbox | center-crop
    pad_value: int = 114
    resize_short: int = 0  # center-crop: resize the short side to this first (0 = fit the crop)


class ModelInfo(msgspec.Struct, **_STRUCT):
    name: str
    version: int
    task: str
    input: InputSpec
    labels_count: int
    max_batch_size: int
    max_queue_delay_ms: float
    queue_limit: int
    confidence: float
    max_detections: int
    inputs: list[tuple[str, str, list[int]]] = []  # (name, dtype, shape) of the ONNX graph
    outputs: list[tuple[str, str, list[int]]] = []
    labels: list[str] = []  # class index -> name (the V2 classification extension's labels)


class Hello(msgspec.Struct, **_STRUCT):
    """Worker -> engine. Without a ring it only asks for ``Ready`` (to learn the slot size).

    ``replaces``: the worker's registered ring that this bigger one replaces while serving; the
    engine keeps the old one mapped until its queued requests are answered.
    """

    pid: int
    ring: str = ""
    slots: int = 0
    slot_bytes: int = 0
    replaces: str = ""


class ModelState(msgspec.Struct, **_STRUCT):
    """One version of the repository: LOADING, READY, UNLOADING or UNAVAILABLE (with the reason)."""

    name: str
    version: int
    state: str
    reason: str = ""


class Ready(msgspec.Struct, **_STRUCT):
    """Engine -> worker: what is served, and whether the worker's ring is registered.

    ``slot_bytes`` is what a ring slot must hold for every model in ``models``: a worker whose ring
    is smaller serves the models that fit and replaces its ring for the others.
    """

    instance: str
    models: list[ModelInfo]
    providers: list[str]
    slot_bytes: int
    registered: bool
    restarts: int = 0
    failed: dict[str, str] = {}  # model -> why it did not load
    # Also sent to every registered worker whenever the model set changes (engine/lifecycle.py).
    states: list[ModelState] = []  # every version the engine knows of, served or not
    control: str = ""  # the model control mode: none | poll | explicit
    ring: str = ""  # the ring of the Hello this answers ("": an announcement of a new model set)


class Infer(msgspec.Struct, **_STRUCT):
    req_id: str
    model: str
    version: int
    slot: int
    generation: int
    height: int
    width: int
    deadline: float  # time.time() after which the engine drops the request
    confidence: float = -1.0  # < 0: the model's default
    max_detections: int = 0  # 0: the model's default
    raw: bool = False  # also return the model's raw output tensors for this image (V2 protocol)
    grouped: bool = False  # one image of a multi-image request: more are on their way (batch here)
    ring: str = ""  # the sender's ring the slot is in ("": its registered ring)


class Detection(msgspec.Struct, **_STRUCT):
    """A box in model-input pixels (x1, y1, x2, y2); the frontend maps it to the original image."""

    x1: float
    y1: float
    x2: float
    y2: float
    score: float
    class_id: int
    label: str


class Classification(msgspec.Struct, **_STRUCT):
    class_id: int
    label: str
    score: float


class Tensor(msgspec.Struct, **_STRUCT):
    name: str
    dtype: str
    shape: list[int]
    data: bytes


class Result(msgspec.Struct, **_STRUCT):
    req_id: str
    slot: int
    generation: int
    model: str
    version: int
    batch_size: int
    queue_ms: float
    inference_ms: float
    detections: list[Detection] = []
    classes: list[Classification] = []
    tensors: list[Tensor] = []


class Error(msgspec.Struct, **_STRUCT):
    req_id: str
    slot: int
    generation: int
    reason: str
    detail: str


class Replies(msgspec.Struct, **_STRUCT):
    """Engine -> worker: the answers to several of its requests that were ready together (a batch's,
    mostly), in one message: one send and one receive for all of them, not one each."""

    items: list[Result | Error]


class Heartbeat(msgspec.Struct, **_STRUCT):
    """Engine -> registered workers, every heartbeat interval."""

    instance: str
    queued: int = 0


class Bye(msgspec.Struct, **_STRUCT):
    """Worker -> engine on a clean stop: forget my ring."""

    pid: int


class Control(msgspec.Struct, **_STRUCT):
    """Any peer -> engine: the repository API. ``action``: index | load | unload."""

    req_id: str
    action: str
    model: str = ""


class ControlReply(msgspec.Struct, **_STRUCT):
    """Engine -> the peer that sent a Control, once the load or unload is done (or failed)."""

    req_id: str
    ok: bool
    detail: str = ""
    states: list[ModelState] = []


Message = Hello | Ready | Infer | Result | Error | Replies | Heartbeat | Bye | Control | ControlReply

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


def encode(msg: Message) -> bytes:
    return _encoder.encode(msg)


def decode(data: bytes) -> Message:
    """Decode one message; raises ``msgspec.DecodeError`` (a ``ValueError``) on garbage."""
    return _decoder.decode(data)


class _Bundle(msgspec.Struct, array_like=True, frozen=True, gc=False, tag="Replies"):
    """A Replies as the engine writes it: answers encoded already (by the batcher threads, where a
    failure is theirs to answer), embedded as they are. The same bytes as encoding a Replies."""

    items: list[msgspec.Raw]


def bundle(payloads: list[bytes]) -> bytes:
    """One Replies from answers already encoded (each an encoded Result or Error)."""
    return _encoder.encode(_Bundle([msgspec.Raw(p) for p in payloads]))


def unpack(msg: Message) -> list[Message]:
    """The messages a received message stands for: a Replies' answers, else the message itself."""
    return list(msg.items) if isinstance(msg, Replies) else [msg]
