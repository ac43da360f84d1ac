"""The declarative base shared by every domain's models.

A naming convention makes constraint names deterministic, so Alembic autogenerate produces
stable migrations and ``DROP CONSTRAINT`` in a downgrade names the right thing.
"""

from __future__ import annotations

import importlib

from sqlalchemy import MetaData
from sqlalchemy.orm import DeclarativeBase

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

MODEL_MODULES = ("service.tasks.models", "service.security.models", "service.idempotency.models")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


def load_models() -> MetaData:
    """Import every model module so ``Base.metadata`` knows all tables (Alembic, tests)."""
    for name in MODEL_MODULES:
        importlib.import_module(name)
    return Base.metadata
