"""Tasks HTTP routes (placeholder: the tasks domain is being built)."""

from fastapi import APIRouter

router = APIRouter(prefix="/v1/tasks", tags=["tasks"])
