"""The control plane: what endpoints exist and who may do what with them.

The endpoint store (SQLite, ``db``), request shapes (``wire``), the service that validates and
changes endpoints (``service``), deployment of new configs, secrets with scope ACLs
(``secrets``), principals, tokens and permissions (``auth``), and MLflow model versions
(``mlflow_models``). Nothing here calls a model; the data plane (``serving.data``) reads what
this plane stores.
"""
