"""The shared serving layer, in two planes and an edge.

* ``serving.control``: the endpoint store and everything that changes it (validation,
  deployment, secrets and their ACLs, principals and permissions).
* ``serving.data``: answering requests (name -> backend resolution, providers, limits, usage,
  and the serving clients the SQL functions call).
* ``serving.api``: the REST API (FastAPI routers), the only part that imports fastapi.
* ``serving.errors``: the error taxonomy every part raises.

Light to import; engines start lazily.
"""
