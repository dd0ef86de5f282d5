"""What ``ai_query`` and ``ai_embed`` mean, independent of the SQL engine that calls them.

An Arrow batch goes in, an Arrow array comes out: NULLs are skipped, identical requests are sent
once, the rest go to the serving client in one call, and results come back in input order. The
connectors (DuckDB, Spark) only register these functions; they never re-implement semantics.
"""
