"""An orjson response (13 µs vs 255 µs for 100 detections with the json module).

It subclasses Starlette's JSONResponse so that FastAPI documents routes as JSON.
"""

from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import JSONResponse as _StarletteJSON


class JSONResponse(_StarletteJSON):
    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)
