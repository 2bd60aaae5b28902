"""Registry of data schemas (pydantic models) by event type.

pydantic loads with the first schema the registry needs: a model registered or parsed into,
or a standard type published (:mod:`bus.catalog` holds their schemas). A bot that publishes
and subscribes without schemas never loads it (it is about 9 MiB of an idle bot's memory).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from bus.errors import SchemaError

if TYPE_CHECKING:
    from pydantic import BaseModel, ValidationError


@functools.cache
def _standard_types() -> frozenset[str]:
    """The standard types' names, imported on the first publish (not on every one)."""
    from bus.event_types import STANDARD_TYPES  # noqa: PLC0415 - a bot that only consumes

    return STANDARD_TYPES


def _describe(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or '(root)'}: {err['msg']}" for err in exc.errors()
    )


class SchemaRegistry:
    """Maps event types to data models; ``strict`` refuses types with no schema.

    With ``standard`` the standard types' schemas are in it too, loaded on first use.
    """

    __slots__ = ("_models", "_standard_pending", "strict")

    def __init__(self, *, strict: bool = False, standard: bool = True) -> None:
        self._models: dict[str, type[BaseModel]] = {}
        #: Whether the standard schemas are still to be loaded (with pydantic).
        self._standard_pending = standard
        self.strict = strict

    def register(self, type_: str, model: type[BaseModel]) -> None:
        """Declare the schema of ``type_``'s data; later publishes are validated against it."""
        self._models[str(type_)] = model

    def get(self, type_: str) -> type[BaseModel] | None:
        """The model registered for a type, if any."""
        model = self._models.get(type_)
        if model is None and self._standard_pending and type_ in _standard_types():
            self._load_standard()
            model = self._models.get(type_)
        return model

    def _load_standard(self) -> None:
        """Add the standard schemas under the ones registered (which win)."""
        from bus.catalog import STANDARD_SCHEMAS  # noqa: PLC0415 - pydantic, on first need

        self._models = {**STANDARD_SCHEMAS, **self._models}
        self._standard_pending = False

    def check(self, type_: str, data: Mapping[str, Any]) -> None:
        """Validate data for publishing; raise :class:`SchemaError` naming the bad fields."""
        model = self.get(type_)
        if model is None:
            if self.strict:
                raise SchemaError(
                    "type",
                    f"no schema is registered for {type_!r} and strict schemas are on: "
                    "register one with bus.schemas.register(type, Model) or turn strict off",
                )
            return
        from pydantic import ValidationError  # noqa: PLC0415 - loaded with the model

        try:
            model.model_validate(data)
        except ValidationError as exc:
            raise SchemaError(
                "data", f"does not match the {type_} schema: {_describe(exc)}"
            ) from None

    def parse(self, model: type[BaseModel], type_: str, data: Mapping[str, Any]) -> BaseModel:
        """Parse received data into ``model``; raise :class:`SchemaError` if it does not fit."""
        from pydantic import ValidationError  # noqa: PLC0415 - loaded with the model

        try:
            return model.model_validate(data)
        except ValidationError as exc:
            raise SchemaError(
                "data", f"does not match {model.__name__} for {type_}: {_describe(exc)}"
            ) from None

    def __repr__(self) -> str:
        types = len(self._models) if not self._standard_pending else f"{len(self._models)}+standard"
        return f"<SchemaRegistry types={types} strict={self.strict}>"
