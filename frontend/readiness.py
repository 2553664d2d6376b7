"""Which models /health/ready waits for (RINGSERVE_REQUIRED_MODELS), and each version's state.

Ready means every required model has a version that is loaded and warmed up. A model that is
being replaced stays ready: its old version serves until the new one is warm (engine/lifecycle.py).
"""

from __future__ import annotations

from frontend.client import EngineClient
from frontend.settings import Settings


def required(settings: Settings) -> list[str]:
    """RINGSERVE_REQUIRED_MODELS: comma-separated names; empty: the default model; "-": none."""
    text = settings.required_models.strip()
    if text == "-":
        return []
    if not text:
        return [settings.default_model]
    return [name.strip() for name in text.split(",") if name.strip()]


def missing(client: EngineClient, settings: Settings) -> list[str]:
    served = {name for name, _version in client.models}
    return [name for name in required(settings) if name not in served]


def states(client: EngineClient) -> dict[str, dict[str, str]]:
    """``{"model/version": {"state": ..., "reason": ...}}`` as the engine last announced them."""
    if client.ready is None:
        return {}
    out: dict[str, dict[str, str]] = {}
    for s in client.ready.states:
        entry = {"state": s.state}
        if s.reason:
            entry["reason"] = s.reason
        out[f"{s.name}/{s.version}"] = entry
    return out
