"""Context schemas: the pydantic models that a context's data must pass."""

from __future__ import annotations

import json
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from hivebus.errors import ConfigError, ContextValidationError

ModelT = TypeVar("ModelT", bound=BaseModel)
ContextData = BaseModel | dict[str, Any]

DEFAULT_MAX_BYTES = 1024 * 1024


class ContextSchemas:
    """The schemas known to one process, and the checks every version passes.

    Args:
        max_bytes: largest context data, as JSON; larger data is rejected.
    """

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.max_bytes = max_bytes
        self._models: dict[str, type[BaseModel]] = {}

    def register(self, name: str, model: type[ModelT]) -> type[ModelT]:
        """Register ``model`` as schema ``name`` and return it."""
        known = self._models.get(name)
        if known is not None and known is not model:
            msg = (
                f"context schema {name!r} is already registered to "
                f"{known.__qualname__}; register {model.__qualname__} under "
                "another name"
            )
            raise ConfigError(msg)
        self._models[name] = model
        return model

    def name_of(self, data: ContextData, schema: str | None) -> str | None:
        """Return ``schema``, or the registered name of ``data``'s model."""
        if schema is not None or not isinstance(data, BaseModel):
            return schema
        for name, model in self._models.items():
            if model is type(data):
                return name
        msg = (
            f"model {type(data).__qualname__} is not a registered context schema: "
            "call `register_schema(NAME, Model)`, or pass the data as a dict"
        )
        raise ConfigError(msg)

    def encode(self, context_id: str, schema: str | None, data: Any) -> str:
        """Validate ``data`` against ``schema`` and return it as compact JSON.

        Raises:
            ContextValidationError: the data fails the schema, is not a JSON
                object, or is larger than ``max_bytes``.
            ConfigError: this process has not registered ``schema``.
        """
        if schema is not None:
            data = self._validate(context_id, schema, data)
        elif isinstance(data, BaseModel):
            data = data.model_dump(mode="json")
        if not isinstance(data, dict):
            msg = (
                f"data of context {context_id!r} must be a JSON object (dict), "
                f"got {type(data).__name__}"
            )
            raise ContextValidationError(msg)
        try:
            text = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
        except (TypeError, ValueError) as exc:
            msg = f"data of context {context_id!r} is not JSON-serialisable: {exc}"
            raise ContextValidationError(msg) from exc
        size = len(text.encode())
        if size > self.max_bytes:
            msg = (
                f"data of context {context_id!r} is {size} bytes, over the limit of "
                f"{self.max_bytes}; keep large documents elsewhere and store a "
                "reference, or raise `max_bytes`"
            )
            raise ContextValidationError(msg)
        return text

    def _validate(self, context_id: str, schema: str, data: Any) -> dict[str, Any]:
        model = self._models.get(schema)
        if model is None:
            msg = (
                f"context {context_id!r} uses schema {schema!r}, which this process "
                f"has not registered; call `register_schema({schema!r}, Model)`"
            )
            raise ConfigError(msg)
        if isinstance(data, BaseModel) and not isinstance(data, model):
            data = data.model_dump(mode="json")
        try:
            valid = data if isinstance(data, model) else model.model_validate(data)
        except ValidationError as exc:
            msg = f"data of context {context_id!r} fails schema {schema!r}: {exc}"
            raise ContextValidationError(msg) from exc
        return valid.model_dump(mode="json")
