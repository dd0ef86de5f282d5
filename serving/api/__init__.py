"""The REST edge: one FastAPI router per API family, authentication before anything else.

Only this package imports fastapi. ``serving.api.app.create_app`` assembles the routers.
"""
