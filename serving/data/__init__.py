"""The data plane: answering requests.

Name resolution (``directory``: endpoint name -> backend; ``routing``: served entities, traffic
split, fallback), the backends themselves (``backends``: the local engine and the test double;
``providers``: external APIs; ``custom_models``: MLflow pyfunc models), rate limits
(``limits``), usage tracking (``usage``), and the clients the SQL functions call
(``client`` in-process, ``http_client`` + ``batch_wire`` to a remote ``sqlinfer serve``), plus the
real-time query bodies (``invocations``). It reads the control plane's store, never writes config.
"""
