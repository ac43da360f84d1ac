"""The query parameters of ``GET /v1/tasks``, declared once as a model (one dependency)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Query
from pydantic import AfterValidator, BaseModel, Field

from service.tasks.models import TaskPriority, TaskStatus
from service.tasks.repository import TaskFilters
from service.tasks.schemas import (
    NO_NUL_PATTERN,
    TAG_MAX,
    TITLE_MAX,
    TRIMMED_PATTERN,
    RFC3339DateTime,
    storable_text,
    untrimmed_tag,
)
from service.tasks.sorting import DEFAULT_SORT, TaskSort

QueryDateTime = RFC3339DateTime | None


class TaskListQuery(BaseModel):
    status: TaskStatus | None = Field(None, description="Only tasks in this status")
    priority: TaskPriority | None = Field(None, description="Only tasks of this priority")
    # Field inside Annotated, after the validator: OpenAPI then shows the length limits on the
    # parameter's schema beside the pattern (a Field default would move them into anyOf).
    tag: Annotated[
        str | None,
        AfterValidator(untrimmed_tag),
        Field(
            min_length=1,
            max_length=TAG_MAX,
            description="Only tasks carrying this tag",
            json_schema_extra={"pattern": TRIMMED_PATTERN},
        ),
    ] = None
    q: Annotated[
        str | None,
        AfterValidator(storable_text),
        Field(
            min_length=1,
            max_length=TITLE_MAX,
            description="Only tasks whose title contains this text (case-insensitive)",
            json_schema_extra={"pattern": NO_NUL_PATTERN},
        ),
    ] = None
    due_before: QueryDateTime = Field(
        None,
        description="Only tasks due before this instant (RFC 3339 with offset, year 1900-9998)",
    )
    due_after: QueryDateTime = Field(
        None,
        description="Only tasks due at or after this instant (RFC 3339 with offset, "
        "year 1900-9998)",
    )
    sort: TaskSort = Field(DEFAULT_SORT, description="Order of the results")
    limit: int = Field(20, ge=1, le=100, description="Page size")
    cursor: str | None = Field(
        None, max_length=512, description="`next_cursor` of the previous page"
    )

    def filters(self) -> TaskFilters:
        return TaskFilters(
            status=self.status,
            priority=self.priority,
            tag=self.tag,
            q=self.q,
            due_before=self.due_before,
            due_after=self.due_after,
        )


TaskListParams = Annotated[TaskListQuery, Query()]
