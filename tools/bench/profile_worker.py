"""``make profile``: where a loaded worker spends its time (not a test).

Starts the service with ONE worker on an embedded PostgreSQL, seeds tasks, drives wrk at one
request type (PROFILE_REQUEST=get|list|post, default get; PROFILE_CONNECTIONS=32,
PROFILE_SECONDS=15) and records the worker with py-spy at the same time. Writes

- ``<out>/profile-<request>.speedscope.json``: open it at speedscope.app (or any speedscope
  viewer) for the flame graph;
- ``<out>/profile-<request>.txt``: the top functions by own time and by inclusive time,

and prints the table. ``<out>`` is PROFILE_OUT (default ``.data/profile``). py-spy needs to
ptrace the worker: run as root or with ``kernel.yama.ptrace_scope=0``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

from tools.bench.procstat import tree
from tools.bench.run import System as _System
from tools.bench.run import (
    create_key,
    migrated_postgres,
    seed,
    serve,
    single_worker_env,
    url_for,
)
from tools.bench.wrk import run as wrk_run
from tools.kit import REPO as ROOT
from tools.kit import find_binary

REQUEST = os.environ.get("PROFILE_REQUEST", "get")
CONNECTIONS = int(os.environ.get("PROFILE_CONNECTIONS", "32"))
SECONDS = int(os.environ.get("PROFILE_SECONDS", "15"))
OUT = Path(os.environ.get("PROFILE_OUT", ROOT / ".data" / "profile"))
TOP = int(os.environ.get("PROFILE_TOP", "25"))


def frame_name(frame: dict[str, Any]) -> str:
    file = frame.get("file") or ""
    for marker in ("site-packages/", "/service/", "/lib/python3"):
        if marker in file:
            file = file.split(marker, 1)[1]
            if marker == "/service/":
                file = "service/" + file
            break
    line = frame.get("line")
    return f"{frame['name']} ({file}{':' + str(line) if line else ''})"


def package_of(frame: dict[str, Any]) -> str:
    file = frame.get("file") or ""
    if "site-packages/" in file:
        return file.split("site-packages/", 1)[1].split("/", 1)[0].removesuffix(".py")
    if "/service/" in file:
        return "service (this project)"
    if "/lib/python3" in file or file.startswith("<frozen"):
        return "python stdlib (asyncio, ...)"
    return file or "?"


def summarise(speedscope: dict[str, Any], top: int) -> str:
    """Own time per package and per function, and inclusive time of this project's functions,
    from a speedscope document of sampled profiles."""
    frames = speedscope["shared"]["frames"]
    own: Counter[int] = Counter()
    inclusive: Counter[int] = Counter()
    total = 0.0
    for profile in speedscope["profiles"]:
        for stack, weight in zip(profile["samples"], profile["weights"], strict=True):
            total += weight
            if stack:
                own[stack[-1]] += weight
            for index in set(stack):
                inclusive[index] += weight
    if not total:
        return "no samples (did py-spy attach?)"
    packages: Counter[str] = Counter()
    for index, weight in own.items():
        packages[package_of(frames[index])] += weight
    lines = [f"{'own %':>6}  package", "-" * 60]
    lines += [f"{w / total:>6.1%}  {name}" for name, w in packages.most_common(top)]
    lines += ["", f"{'own %':>6}  function", "-" * 60]
    lines += [f"{w / total:>6.1%}  {frame_name(frames[i])}" for i, w in own.most_common(top)]
    ours = Counter(
        {i: w for i, w in inclusive.items() if "/service/" in (frames[i].get("file") or "")}
    )
    lines += ["", f"{'incl %':>6}  function of this project (with what it calls)", "-" * 60]
    lines += [f"{w / total:>6.1%}  {frame_name(frames[i])}" for i, w in ours.most_common(top)]
    return "\n".join(lines)


def main() -> int:
    py_spy = find_binary("py-spy")
    if py_spy is None:
        print("make profile needs py-spy (a dev dependency: make install)", file=sys.stderr)
        return 2
    OUT.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="fastapi-app-profile-"))
    pg = migrated_postgres(work)
    try:
        env, port = single_worker_env(pg, work, SQLALCHEMY_POOL_SIZE=str(CONNECTIONS))
        key = create_key(env, str(uuid.uuid4()))
        with serve([sys.executable, "-m", "service", "serve"], env, "/health/ready", port) as (
            process,
            _,
        ):
            base = f"http://127.0.0.1:{port}"
            ids = seed(base, key)
            system = _System("service", base, list, list, {"X-API-Key": key}, ids[len(ids) // 2])
            url = url_for(system, REQUEST)
            post = REQUEST == "post"
            wrk_run(url, connections=CONNECTIONS, duration_s=3, headers=system.headers, post=post)
            (worker,) = sorted(tree(process.pid) - {process.pid})
            output = OUT / f"profile-{REQUEST}.speedscope.json"
            recorder = subprocess.Popen(
                [
                    *(py_spy, "record", "--pid", str(worker), "--duration", str(SECONDS)),
                    *("--rate", "250", "--format", "speedscope", "--output", str(output)),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            result = wrk_run(
                url,
                connections=CONNECTIONS,
                duration_s=SECONDS,
                headers=system.headers,
                post=post,
                idempotency=post,
            )
            _, errors = recorder.communicate(timeout=SECONDS + 60)
            if recorder.returncode != 0:
                print(f"py-spy failed: {errors.strip()}", file=sys.stderr)
                return 1
        summary = summarise(json.loads(output.read_text()), TOP)
        header = (
            f"{REQUEST} with 1 worker, {CONNECTIONS} connections, {SECONDS} s: "
            f"{result.requests_per_second:.0f} req/s, p99 {result.p99_ms:.1f} ms, "
            f"{result.errors} errors"
        )
        text = f"{header}\n\n{summary}\n"
        (OUT / f"profile-{REQUEST}.txt").write_text(text)
        print(text)
        print(f"flame graph: {output} (open at speedscope.app)")
    finally:
        pg.stop(mode="immediate")
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
