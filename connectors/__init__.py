"""How the SQL functions are registered in SQL engines (``connectors.duckdb``; Spark later),
and the ``sqlinfer`` command line (``connectors.cli``), which sits at the edge of the project."""
