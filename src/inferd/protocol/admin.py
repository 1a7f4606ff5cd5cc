"""``/admin/models``: the models a server can serve, loaded or not, and what an operator asks of them."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from inferd.protocol.limits import MAX_MODEL_NAME_CHARS


class AdminModel(BaseModel):
    id: str
    kind: str
    state: str  # loaded, loading, unloading, unloaded
    pinned: bool
    resident_bytes: int
    expires_at: float | None  # unix seconds; null: no expiry (pinned, forever, or unloaded)
    keep_alive: float | None  # seconds idle before unloading; null: forever
    in_flight: int
    source: str


class AdminModelList(BaseModel):
    object: str = "list"
    data: list[AdminModel]


class _ModelRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1, max_length=MAX_MODEL_NAME_CHARS)


class LoadRequest(_ModelRequest):
    pin: bool | None = None
    # A duration ("5m"), seconds, 0 (unload once idle) or -1 (forever); absent: unchanged.
    keep_alive: str | float | None = Field(None, union_mode="left_to_right")


class UnloadRequest(_ModelRequest):
    force: bool = False  # abort the model's requests in flight instead of waiting for them


class PinRequest(_ModelRequest):
    pinned: bool = True
