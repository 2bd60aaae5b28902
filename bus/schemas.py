"""Registry of data schemas (pydantic models) by event type."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ValidationError

from bus.catalog import STANDARD_SCHEMAS
from bus.errors import SchemaError


def _describe(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or '(root)'}: {err['msg']}" for err in exc.errors()
    )


class SchemaRegistry:
    """Maps event types to data models; ``strict`` refuses types with no schema."""

    __slots__ = ("_models", "strict")

    def __init__(self, *, strict: bool = False, standard: bool = True) -> None:
        self._models: dict[str, type[BaseModel]] = dict(STANDARD_SCHEMAS) if standard else {}
        self.strict = strict

    def register(self, type_: str, model: type[BaseModel]) -> None:
        """Declare the schema of ``type_``'s data; later publishes are validated against it."""
        self._models[str(type_)] = model

    def get(self, type_: str) -> type[BaseModel] | None:
        """The model registered for a type, if any."""
        return self._models.get(type_)

    def check(self, type_: str, data: Mapping[str, Any]) -> None:
        """Validate data for publishing; raise :class:`SchemaError` naming the bad fields."""
        model = self._models.get(type_)
        if model is None:
            if self.strict:
                raise SchemaError(
                    "type",
                    f"no schema is registered for {type_!r} and strict schemas are on: "
                    "register one with bus.schemas.register(type, Model) or turn strict off",
                )
            return
        try:
            model.model_validate(data)
        except ValidationError as exc:
            raise SchemaError(
                "data", f"does not match the {type_} schema: {_describe(exc)}"
            ) from None

    def parse(self, model: type[BaseModel], type_: str, data: Mapping[str, Any]) -> BaseModel:
        """Parse received data into ``model``; raise :class:`SchemaError` if it does not fit."""
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            raise SchemaError(
                "data", f"does not match {model.__name__} for {type_}: {_describe(exc)}"
            ) from None

    def __repr__(self) -> str:
        return f"<SchemaRegistry types={len(self._models)} strict={self.strict}>"
