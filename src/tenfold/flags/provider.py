"""An OpenFeature provider evaluating tenfold flags locally (`pip install 'tenfold[openfeature]'`).

    from openfeature import api
    from openfeature.evaluation_context import EvaluationContext
    from tenfold.flags.provider import TenfoldProvider

    api.set_provider(TenfoldProvider(base_url=URL, api_key=KEY, environment="production"))
    client = api.get_client()
    client.get_boolean_value("new-checkout", False, EvaluationContext("u-42", {"plan": "pro"}))

The provider wraps a `FlagsClient` (given, or built from the keyword arguments) and owns it:
`initialize` starts it and `shutdown` closes it. It is ready once the client holds a ruleset
(the server's, or a bootstrap); without one, initialisation fails (PROVIDER_ERROR) and the
provider turns READY when the server first answers. Events: PROVIDER_CONFIGURATION_CHANGED
(with `flags_changed`) on every change; PROVIDER_STALE when the stream has been down longer
than the client's `stale_after`, PROVIDER_READY when it is back.

The context's targeting key is the user (`targetingKey`, also readable as `user_id` in rules);
its attributes are the rest. Dates become milliseconds since the epoch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

try:
    from openfeature.evaluation_context import EvaluationContext
    from openfeature.event import ProviderEventDetails
    from openfeature.exception import ErrorCode, ProviderNotReadyError
    from openfeature.flag_evaluation import FlagResolutionDetails, FlagValueType, Reason
    from openfeature.provider import AbstractProvider, Metadata
    from openfeature.track import TrackingEventDetails
except ImportError as exc:  # pragma: no cover - the extra is installed in development
    raise ImportError(
        "tenfold's OpenFeature provider needs openfeature-sdk: "
        "run `pip install 'tenfold[openfeature]'`"
    ) from exc

from tenfold.flags.client import FlagsClient
from tenfold.flags.evaluation import Evaluation
from tenfold.flags.models import is_number

__all__ = ["TenfoldProvider"]

_REASONS = {r.value: r for r in Reason}
_ERRORS = {c.value: c for c in ErrorCode}
ObjectValue = Sequence[FlagValueType] | Mapping[str, FlagValueType]


def to_context(evaluation_context: EvaluationContext | None) -> dict[str, Any]:
    """An OpenFeature context as a tenfold context: attributes, plus the targeting key as
    `targetingKey` and (unless an attribute says otherwise) `user_id`."""
    if evaluation_context is None:
        return {}
    ctx = {k: _attribute(v) for k, v in evaluation_context.attributes.items()}
    key = evaluation_context.targeting_key
    if key:
        ctx["targetingKey"] = key
        ctx.setdefault("user_id", key)
    return ctx


def _attribute(value: Any) -> Any:
    if isinstance(value, datetime):
        moment = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
        return moment.timestamp() * 1000.0
    if isinstance(value, Mapping):
        return {k: _attribute(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_attribute(v) for v in value]
    return value


def _is_integer(value: object) -> bool:
    return is_number(value) and (isinstance(value, int) or float(value).is_integer())  # type: ignore[arg-type]


class TenfoldProvider(AbstractProvider):
    """OpenFeature's view of a `FlagsClient` (see the module)."""

    def __init__(
        self, client: FlagsClient | None = None, *, start_wait: float = 5.0, **options: Any
    ) -> None:
        """`TenfoldProvider(flags_client)` or `TenfoldProvider(base_url=..., api_key=...,
        environment=..., ...)` with `FlagsClient`'s arguments. `start_wait`: seconds
        `initialize` waits for the server's ruleset."""
        super().__init__()
        if client is not None and options:
            raise TypeError("give a FlagsClient or its arguments, not both")
        self.client = client if client is not None else FlagsClient(**options)
        self._start_wait = start_wait
        self._initializing = False
        self._waiting_for_data = False  # initialisation failed: READY when data comes
        self._unsubscribe: list[Callable[[], None]] = []

    def get_metadata(self) -> Metadata:
        return Metadata(name="tenfold")

    # --- life cycle ---------------------------------------------------------------------------

    def initialize(self, evaluation_context: EvaluationContext) -> None:
        if not self._unsubscribe:
            self._unsubscribe = [
                self.client.on_change(self._changed),
                self.client.on_stale(self._stale),
            ]
        self._initializing = True
        try:
            self.client.start(self._start_wait)
            if self.client.ruleset is None:
                self._waiting_for_data = True
                error = self.client.last_error
                raise ProviderNotReadyError(
                    "no ruleset yet"
                    + (f" ({error})" if error is not None else " (the server has not answered)")
                )
        finally:
            self._initializing = False

    def shutdown(self) -> None:
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        self._unsubscribe = []
        self.client.close()

    def _changed(self, keys: frozenset[str]) -> None:
        details = ProviderEventDetails(flags_changed=sorted(keys))
        if self._waiting_for_data:
            self._waiting_for_data = False
            self.emit_provider_ready(details)
        elif not self._initializing:  # the first load is announced by PROVIDER_READY
            self.emit_provider_configuration_changed(details)

    def _stale(self, stale: bool) -> None:
        if self._waiting_for_data:
            return
        if stale:
            message = "the flag stream is down; serving the last ruleset"
            error = self.client.last_error
            self.emit_provider_stale(
                ProviderEventDetails(message=f"{message} ({error})" if error else message)
            )
        else:
            self.emit_provider_ready(ProviderEventDetails(message="the flag stream is back"))

    # --- resolution ---------------------------------------------------------------------------

    def _resolve(
        self,
        flag_key: str,
        default: Any,
        evaluation_context: EvaluationContext | None,
        fits: Callable[[object], bool],
        convert: Callable[[Any], Any],
        wanted: str,
    ) -> FlagResolutionDetails[Any]:
        result = self.client.evaluate(flag_key, to_context(evaluation_context))
        if result.error_code is not None:
            return FlagResolutionDetails(
                value=default,
                error_code=_ERRORS.get(result.error_code, ErrorCode.GENERAL),
                error_message=result.error_message,
                reason=Reason.ERROR,
            )
        if not fits(result.value):
            return FlagResolutionDetails(
                value=default,
                error_code=ErrorCode.TYPE_MISMATCH,
                error_message=f"flag {flag_key!r} served {type(result.value).__name__}, "
                f"not {wanted}",
                reason=Reason.ERROR,
            )
        return FlagResolutionDetails(
            value=convert(result.value),
            variant=result.variation,
            reason=_REASONS.get(result.reason, result.reason),
            flag_metadata=self._metadata(result),
        )

    def _metadata(self, result: Evaluation) -> dict[str, bool | int | float | str]:
        out: dict[str, bool | int | float | str] = {}
        if result.rule_id is not None:
            out["rule_id"] = result.rule_id
        revision = self.client.revision
        if revision is not None:
            out["revision"] = revision
        return out

    def resolve_boolean_details(
        self,
        flag_key: str,
        default_value: bool,
        evaluation_context: EvaluationContext | None = None,
    ) -> FlagResolutionDetails[bool]:
        return self._resolve(
            flag_key,
            default_value,
            evaluation_context,
            lambda v: isinstance(v, bool),
            bool,
            "a boolean",
        )

    def resolve_string_details(
        self,
        flag_key: str,
        default_value: str,
        evaluation_context: EvaluationContext | None = None,
    ) -> FlagResolutionDetails[str]:
        return self._resolve(
            flag_key,
            default_value,
            evaluation_context,
            lambda v: isinstance(v, str),
            str,
            "a string",
        )

    def resolve_integer_details(
        self,
        flag_key: str,
        default_value: int,
        evaluation_context: EvaluationContext | None = None,
    ) -> FlagResolutionDetails[int]:
        return self._resolve(
            flag_key, default_value, evaluation_context, _is_integer, int, "an integer"
        )

    def resolve_float_details(
        self,
        flag_key: str,
        default_value: float,
        evaluation_context: EvaluationContext | None = None,
    ) -> FlagResolutionDetails[float]:
        return self._resolve(
            flag_key, default_value, evaluation_context, is_number, float, "a number"
        )

    def resolve_object_details(
        self,
        flag_key: str,
        default_value: ObjectValue,
        evaluation_context: EvaluationContext | None = None,
    ) -> FlagResolutionDetails[ObjectValue]:
        return self._resolve(
            flag_key,
            default_value,
            evaluation_context,
            lambda v: isinstance(v, dict | list),
            lambda v: v,
            "an object or a list",
        )

    # The async resolvers are AbstractProvider's: evaluation is in memory, nothing to await.

    def track(
        self,
        tracking_event_name: str,
        evaluation_context: EvaluationContext | None = None,
        tracking_event_details: TrackingEventDetails | None = None,
    ) -> None:
        """A conversion of the metric `tracking_event_name` (its value from the details)."""
        value = tracking_event_details.value if tracking_event_details is not None else None
        self.client.track(tracking_event_name, to_context(evaluation_context), value)
