"""Custom models: MLflow pyfunc models (scikit-learn, a ``PythonModel``...) behind an endpoint.

MLflow's scoring protocol is frame-shaped (``dataframe_split``, ``dataframe_records``,
``instances``, ``inputs``), while the serving layer works row by row so that rate limits, usage
rows, traffic split and fallback treat custom models like every other endpoint. So a request is
split into rows here (:func:`rows_of`), the backend rebuilds *one* frame from a whole batch of
rows and calls ``predict`` once with MLflow's own parser and the model's signature (the same
conversion ``mlflow models serve`` does), and the predictions are split back into rows. If the
batch as a whole fails, each row is predicted alone so a bad row fails only itself.

A model is loaded once per process, on first use, and shared by every endpoint serving it.
"""

from __future__ import annotations

import threading
from typing import Any, Sequence

from engine.types import CUSTOM_TASK, PredictionResult
from serving.data.backends import Backend, ResultCallback
from serving.errors import InvalidParameterValue

INPUT_FORMATS = ("dataframe_split", "dataframe_records", "instances", "inputs")

_MODELS: dict[str, Any] = {}
_MODELS_LOCK = threading.Lock()


def rows_of(body: dict[str, Any]) -> tuple[list[Any], dict[str, Any] | None]:
    """A scoring request as (rows, params); each row is a dict of columns or a single instance."""
    formats = [f for f in INPUT_FORMATS if f in body]
    if len(formats) != 1:
        raise InvalidParameterValue(
            f"a custom-model query needs exactly one of {', '.join(INPUT_FORMATS)}; got "
            f"{', '.join(formats) or 'none'} (fields sent: {', '.join(sorted(body)) or 'none'})"
        )
    kind, data = formats[0], body[formats[0]]
    params = body.get("params")
    if params is not None and not isinstance(params, dict):
        raise InvalidParameterValue("params must be an object of parameter names to values")
    if kind == "dataframe_split":
        if not isinstance(data, dict) or not isinstance(data.get("data"), list):
            raise InvalidParameterValue("dataframe_split must be an object with 'columns' and 'data' (a list of rows)")
        columns = data.get("columns")
        if columns is None:
            return [list(row) if isinstance(row, list) else row for row in data["data"]], params
        for index, row in enumerate(data["data"]):
            if not isinstance(row, list) or len(row) != len(columns):
                raise InvalidParameterValue(f"dataframe_split.data[{index}] must be a list of {len(columns)} values (one per column)")
        return [dict(zip(columns, row)) for row in data["data"]], params
    if kind == "dataframe_records":
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise InvalidParameterValue("dataframe_records must be a list of objects (one per row)")
        return list(data), params
    if isinstance(data, dict):  # columnar tensors: {"a": [1, 2], "b": [3, 4]} is two rows
        lengths = {len(v) if isinstance(v, list) else None for v in data.values()}
        if len(lengths) != 1 or None in lengths:
            raise InvalidParameterValue(f"{kind} given as an object must map every input name to a list of equal length")
        names = list(data)
        return [dict(zip(names, values)) for values in zip(*data.values())], params
    if not isinstance(data, list):
        raise InvalidParameterValue(f"{kind} must be a list of instances or an object of named lists")
    return list(data), params


def load(path: str) -> Any:
    """The pyfunc model at ``path``, loaded once per process."""
    model = _MODELS.get(path)
    if model is None:
        with _MODELS_LOCK:
            model = _MODELS.get(path)
            if model is None:
                import mlflow.pyfunc

                model = _MODELS[path] = mlflow.pyfunc.load_model(path)
    return model


def loaded_count() -> int:
    return len(_MODELS)


class PyfuncBackend(Backend):
    """An MLflow pyfunc model, predicting a whole batch of rows in one ``predict`` call."""

    task = CUSTOM_TASK

    def __init__(self, path: str, params: dict[str, Any] | None = None):
        self.path = path
        self.params = params

    def predict(self, rows: Sequence[Any], params: dict[str, Any] | None = None,
                on_result: ResultCallback | None = None) -> list[PredictionResult]:
        model = load(self.path)
        try:
            values = self._predict(model, list(rows), params)
            results = [PredictionResult(value=v) for v in values]
        except Exception as whole:  # isolate the failing rows: predict each alone
            if len(rows) == 1:
                results = [PredictionResult(error=_describe(whole), error_status=400)]
            else:
                results = [self.predict([row], params)[0] for row in rows]
        if on_result is not None:
            for index, result in enumerate(results):
                on_result(index, result)
        return results

    def warm_up(self) -> None:
        load(self.path)

    @staticmethod
    def _predict(model: Any, rows: list[Any], params: dict[str, Any] | None) -> list[Any]:
        from mlflow.pyfunc.scoring_server import infer_and_parse_data
        from mlflow.utils.proto_json_utils import _get_jsonable_obj

        payload = {"dataframe_records": rows} if all(isinstance(r, dict) for r in rows) else {"instances": rows}
        data = infer_and_parse_data(payload, model.metadata.get_input_schema())
        raw = model.predict(data, params=params) if params else model.predict(data)
        values = _get_jsonable_obj(raw, pandas_orient="records")
        if not isinstance(values, list) or len(values) != len(rows):
            raise ValueError(f"the model returned {len(values) if isinstance(values, list) else 'a non-list'} "
                             f"predictions for {len(rows)} rows; only row-wise models can be served")
        return values


def _describe(exc: Exception) -> str:
    message = getattr(exc, "message", None) or str(exc)
    return f"{type(exc).__name__}: {message}".strip()[:2000]
