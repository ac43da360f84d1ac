"""fastapi-app: an owner-scoped Tasks API built to be operated in production."""

__version__ = "0.1.0"
