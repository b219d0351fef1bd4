"""JSON columns: encode on write, decode on read, in one place."""

from __future__ import annotations

import json
from typing import Any


def dumps(value: Any) -> str:
    return json.dumps(value if value is not None else {}, sort_keys=True)


def loads(text: str | None) -> Any:
    return json.loads(text) if text else {}
