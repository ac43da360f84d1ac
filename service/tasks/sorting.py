"""The orders a task list can be read in, and the key each one pages by."""

from __future__ import annotations

from enum import StrEnum


class TaskSort(StrEnum):
    CREATED_AT = "created_at"
    CREATED_AT_DESC = "-created_at"
    DUE_AT = "due_at"
    DUE_AT_DESC = "-due_at"
    PRIORITY = "priority"


DEFAULT_SORT = TaskSort.CREATED_AT_DESC

# The shape of the key each sort pages by; ``id`` is always last so the order is total.
#   "ts": timestamp, "ts?": nullable timestamp, "rank": priority rank, "id": task id
KEY_SHAPES: dict[TaskSort, tuple[str, ...]] = {
    TaskSort.CREATED_AT: ("ts", "id"),
    TaskSort.CREATED_AT_DESC: ("ts", "id"),
    TaskSort.DUE_AT: ("ts?", "id"),
    TaskSort.DUE_AT_DESC: ("ts?", "id"),
    TaskSort.PRIORITY: ("rank", "ts", "id"),
}
