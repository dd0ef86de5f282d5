"""Public tables with short rows, as a user would send them to ``ai_query``.

The data is not written for the benchmark: it ships inside the PyPI package ``vega_datasets``
(0.9.0, BSD-3-Clause; the tables come from StatLib, NOAA and the FAA). Each table gets a one-line
instruction and its columns as a STRUCT request, the way the README tells users to write it:
``ai_query(endpoint, {'instruction': '...', 'Name': Name, ...})``. The instruction is the first
field, as a user writes it; the columns follow in the table's own order.

* ``cars``: 406 cars, 9 columns. Rows share their origin, cylinders and model year.
* ``weather``: the first 1,000 days of Seattle's weather, 6 columns. The date goes first in the
  table and is unique; rows share the kind of weather and often the rain (0.0).
* ``airports``: 1,000 US airports, 4 columns that are unique per row (code, name, position):
  rows share nothing beyond the instruction, the case where ordering must not cost anything.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class PublicTable:
    name: str
    file: str
    columns: tuple[str, ...]
    instruction: str
    rows: int
    description: str

    def path(self) -> Path:
        spec = importlib.util.find_spec("vega_datasets")
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit("the public tables come from the vega_datasets package: pip install vega_datasets==0.9.0")
        return Path(spec.submodule_search_locations[0]) / "_data" / self.file

    def source_sql(self) -> str:
        reader = "read_json_auto" if self.file.endswith(".json") else "read_csv_auto"
        return f"{reader}('{self.path()}')"

    def struct_sql(self) -> str:
        """The request as a user writes it: the instruction, then the columns in table order."""
        quoted = self.instruction.replace("'", "''")
        return "{" + ", ".join([f"'instruction': '{quoted}'"] + [f"'{c}': \"{c}\"" for c in self.columns]) + "}"

    def load(self, con: Any, table: str = "t", rows: int | None = None) -> None:
        """``table`` in DuckDB: the first ``rows`` (default: the table's) with their position ``i``."""
        columns = ", ".join(f'"{c}"' for c in self.columns)
        con.execute(f"CREATE OR REPLACE TABLE {table} AS SELECT row_number() OVER () - 1 AS i, {columns} "
                    f"FROM {self.source_sql()} LIMIT {rows or self.rows}")

    def requests(self, con: Any, table: str = "t") -> list[dict[str, Any]]:
        """Each row's request exactly as the SQL function receives it (DuckDB's ``to_json``)."""
        return [json.loads(r[0]) for r in con.execute(f"SELECT to_json({self.struct_sql()})::VARCHAR FROM {table} ORDER BY i").fetchall()]


CARS = PublicTable("cars", "cars.json", ("Name", "Miles_per_Gallon", "Cylinders", "Displacement", "Horsepower",
                                         "Weight_in_lbs", "Acceleration", "Year", "Origin"),
                   "Is this car fuel-efficient for its time? Answer yes or no.", 406,
                   "406 cars, 9 columns (StatLib auto-mpg)")
WEATHER = PublicTable("weather", "seattle-weather.csv", ("date", "precipitation", "temp_max", "temp_min", "wind", "weather"),
                      "Was this a good day for a picnic in Seattle? Answer yes or no.", 1000,
                      "1,000 days of Seattle weather, 6 columns (NOAA)")
AIRPORTS = PublicTable("airports", "airports.csv", ("iata", "name", "latitude", "longitude"),
                       "Is this airport close to the sea? Answer yes or no.", 1000,
                       "1,000 US airports, 4 unique columns (FAA): no sharing beyond the instruction")
TABLES = (CARS, WEATHER, AIRPORTS)
