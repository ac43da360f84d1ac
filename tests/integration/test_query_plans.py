"""Every list query reads only the caller's rows, through an index led by ``owner_id``.

A scratch database gets 1,000,000 tasks spread over 1,000 owners (plus one busy owner with 10,000
tasks), is ANALYZEd, and then ``EXPLAIN (ANALYZE, FORMAT JSON)`` runs the exact statements the
repository builds, with the same bind parameters asyncpg sends, for every sort and filter, on
the first page and on a later one. The assertions:

* no sequential scan of ``tasks``; every scan of it uses an ``ix_tasks_owner_*`` index whose
  index condition includes ``owner_id``;
* the rows a scan touches (returned plus removed by a filter) never exceed the owner's own.

Run with ``-s`` to see the plans.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from sqlalchemy.dialects import postgresql

from service.migrate import upgrade
from service.tasks.cursor import SortKey
from service.tasks.models import TaskPriority, TaskStatus
from service.tasks.repository import GET_BY_ID, TaskFilters, list_statement
from service.tasks.sorting import TaskSort

PAGE = 21  # limit + 1, as the repository asks for
OWNERS = 1_000
ROWS = 1_000_000
BUSY_OWNER = uuid.UUID("00000000-0000-4000-8000-00000000b005")
DIALECT = postgresql.asyncpg.dialect()
NOW = datetime(2030, 6, 1, tzinfo=UTC)

# The busy owner's tasks are spread over the whole creation history (every 100th row) and
# every other column is drawn at random, so no column is correlated with the owner.
SEED_SQL = """
INSERT INTO tasks (id, owner_id, title, description, status, priority, due_at, tags,
                   created_at, updated_at)
SELECT gen_random_uuid(),
       CASE WHEN g % 100 = 0 THEN $2::uuid
            ELSE md5('owner-' || floor(random() * $1)::int)::uuid END,
       'task ' || g || CASE WHEN random() < 0.15 THEN ' report' ELSE '' END,
       CASE WHEN random() < 0.3 THEN 'details' END,
       (ARRAY['todo', 'in_progress', 'done'])[1 + floor(random() * 3)::int],
       floor(random() * 4)::int,
       CASE WHEN random() < 0.2 THEN NULL
            ELSE $3::timestamptz + floor(random() * 2000) * interval '1 hour' END,
       CASE WHEN random() < 0.1 THEN ARRAY['home', 'work']
            ELSE ARRAY['t' || floor(random() * 50)::int] END,
       $3::timestamptz - g * interval '1 second',
       $3::timestamptz - g * interval '1 second'
FROM generate_series(1, $4) AS g
"""

FILTERS: dict[str, TaskFilters] = {
    "none": TaskFilters(),
    "status": TaskFilters(status=TaskStatus.DONE),
    "priority": TaskFilters(priority=TaskPriority.URGENT),
    "tag": TaskFilters(tag="home"),
    "q": TaskFilters(q="report"),
    "due window": TaskFilters(
        due_after=NOW + timedelta(hours=100), due_before=NOW + timedelta(hours=900)
    ),
    "status+tag": TaskFilters(status=TaskStatus.TODO, tag="work"),
}

# A position somewhere in the middle of the busy owner's tasks for each sort.
MIDDLE = NOW - timedelta(seconds=ROWS // 2)
AFTER: dict[TaskSort, SortKey] = {
    TaskSort.CREATED_AT: (MIDDLE, uuid.UUID(int=2**127)),
    TaskSort.CREATED_AT_DESC: (MIDDLE, uuid.UUID(int=2**127)),
    TaskSort.DUE_AT: (NOW + timedelta(hours=500), uuid.UUID(int=2**127)),
    TaskSort.DUE_AT_DESC: (NOW + timedelta(hours=500), uuid.UUID(int=2**127)),
    TaskSort.PRIORITY: (2, MIDDLE, uuid.UUID(int=2**127)),
}
UNDATED_AFTER: SortKey = (None, uuid.UUID(int=2**127))


@pytest.fixture(scope="module")
async def seeded(postgres: Any) -> AsyncIterator[asyncpg.Connection]:
    started = time.perf_counter()
    url = await postgres.create_database("plans")
    await upgrade(url)
    migrated = time.perf_counter()
    connection = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"))
    # Bulk loading is ~5x faster without the indexes: drop the migration's secondary
    # indexes and rebuild them from their own definitions (pg_indexes) after the load.
    definitions = [
        row["indexdef"]
        for row in await connection.fetch(
            "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'tasks' "
            "AND indexname LIKE 'ix_tasks_%' ORDER BY indexname"
        )
    ]
    assert len(definitions) >= 4
    await connection.execute("DROP INDEX " + ", ".join(d.split()[2] for d in definitions))
    await connection.execute("SET synchronous_commit = off")
    await connection.execute("SET maintenance_work_mem = '128MB'")
    await connection.execute(SEED_SQL, OWNERS, BUSY_OWNER, NOW, ROWS)
    for definition in definitions:
        await connection.execute(definition)
    loaded = time.perf_counter()
    await connection.execute("ANALYZE tasks")
    print(
        f"\nscratch database: migrate {migrated - started:.1f}s, load {ROWS} rows "
        f"{loaded - migrated:.1f}s, analyze {time.perf_counter() - loaded:.1f}s"
    )
    yield connection
    await connection.close()


def _scans(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    if node.get("Relation Name") == "tasks" or node.get("Node Type") == "Bitmap Index Scan":
        yield node
    for child in node.get("Plans", []):
        yield from _scans(child)


def _render(node: dict[str, Any], depth: int = 0) -> list[str]:
    detail = [node["Node Type"]]
    if "Index Name" in node:
        detail.append(f"using {node['Index Name']}")
    for field in ("Index Cond", "Filter", "Sort Key"):
        if field in node:
            detail.append(f"{field.lower()}: {node[field]}")
    detail.append(f"rows={node.get('Actual Rows')}")
    if node.get("Rows Removed by Filter"):
        detail.append(f"removed={node['Rows Removed by Filter']}")
    lines = ["  " * depth + " ".join(str(part) for part in detail)]
    for child in node.get("Plans", []):
        lines.extend(_render(child, depth + 1))
    return lines


async def _explain(connection: asyncpg.Connection, statement: Any) -> tuple[dict[str, Any], str]:
    compiled = statement.compile(dialect=DIALECT)
    params = [compiled.params[name] for name in compiled.positiontup]
    sql = str(compiled)
    raw = await connection.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) {sql}", *params)
    plan: dict[str, Any] = json.loads(raw)[0]["Plan"]
    return plan, sql


def _sorted_inputs(node: dict[str, Any]) -> Iterator[int]:
    if node["Node Type"] == "Sort":
        yield sum(child["Actual Rows"] for child in node.get("Plans", []))
    for child in node.get("Plans", []):
        yield from _sorted_inputs(child)


def _check(plan: dict[str, Any], owner_rows: int, label: str, *, ordered: bool) -> None:
    label = label + "\n" + "\n".join(_render(plan, 1))
    if ordered:
        # Without filters every sort is an ordered index scan that stops at the page size;
        # the only sort allowed is merging the two parts of a due_at page (2 x 21 rows).
        assert all(rows <= 2 * PAGE for rows in _sorted_inputs(plan)), label
    scans = list(_scans(plan))
    assert scans, label
    for scan in scans:
        kind = scan["Node Type"]
        assert kind != "Seq Scan", f"{label}: sequential scan of tasks"
        if kind == "Bitmap Heap Scan":
            continue  # its Bitmap Index Scan children are checked themselves
        assert kind in {"Index Scan", "Index Only Scan", "Bitmap Index Scan"}, (label, kind)
        assert scan["Index Name"].startswith("ix_tasks_owner_"), (label, scan["Index Name"])
        assert "owner_id =" in scan["Index Cond"], (label, scan["Index Cond"])
        touched = (scan["Actual Rows"] + scan.get("Rows Removed by Filter", 0)) * scan.get(
            "Actual Loops", 1
        )
        assert touched <= owner_rows, f"{label}: read {touched} rows, the owner has {owner_rows}"


@pytest.mark.parametrize("owner", ["busy", "typical"])
async def test_every_sort_and_filter_reads_only_the_owners_rows(
    seeded: asyncpg.Connection, owner: str
) -> None:
    if owner == "busy":
        owner_id = BUSY_OWNER
    else:
        owner_id = uuid.UUID(await seeded.fetchval("SELECT md5('owner-' || 7)::uuid::text"))
    owner_rows = await seeded.fetchval("SELECT count(*) FROM tasks WHERE owner_id = $1", owner_id)
    assert owner_rows >= 150
    total = await seeded.fetchval("SELECT count(*) FROM tasks")
    assert total == ROWS

    report: list[str] = []
    for sort in TaskSort:
        for name, filters in FILTERS.items():
            positions: list[tuple[str, SortKey | None]] = [
                ("first page", None),
                ("later page", AFTER[sort]),
            ]
            if sort in (TaskSort.DUE_AT, TaskSort.DUE_AT_DESC):
                positions.append(("undated part", UNDATED_AFTER))
            for where, after in positions:
                statement = list_statement(owner_id, filters, sort, PAGE, after)
                plan, _ = await _explain(seeded, statement)
                label = f"{owner} owner, sort={sort.value}, filter={name}, {where}"
                _check(plan, owner_rows, label, ordered=name == "none")
                report.append(f"-- {label}: {plan['Actual Total Time']:.2f} ms")
                report.extend(_render(plan, 1))
    print(f"\n{owner} owner ({owner_rows} of {total} tasks):\n" + "\n".join(report))


async def test_get_by_id_is_one_primary_key_lookup(seeded: asyncpg.Connection) -> None:
    task_id, owner_id = await seeded.fetchrow(
        "SELECT id, owner_id FROM tasks WHERE owner_id = $1 LIMIT 1", BUSY_OWNER
    )
    plan, _ = await _explain(seeded, GET_BY_ID.params(task_id=task_id, owner_id=owner_id))
    assert plan["Node Type"] == "Index Scan"
    assert plan["Index Name"] == "pk_tasks"
    print("\nGET /v1/tasks/{id}:\n" + "\n".join(_render(plan, 1)))
