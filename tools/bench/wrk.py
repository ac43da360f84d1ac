"""Run wrk (Debian's package) for a bounded time and parse what it prints."""

from __future__ import annotations

import dataclasses
import re
import resource
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tools.kit import find_binary

# wrk.format() sends only the headers it is given, not the -H ones: copy those in (without them
# every POST was a fast 401, counted as an error and inflating requests/s).
POST_SCRIPT = """
counter = 0
-- Each wrk thread runs its own copy of this script: a random prefix keeps their keys apart.
math.randomseed(os.time() + math.floor(os.clock() * 1000000))
prefix = string.format("%08x%08x", math.random(0, 0x7fffffff), math.random(0, 0x7fffffff))
request = function()
  counter = counter + 1
  local headers = {}
  for name, value in pairs(wrk.headers) do headers[name] = value end
  headers["Content-Type"] = "application/json"
  if IDEMPOTENCY then headers["Idempotency-Key"] = prefix .. "-" .. counter end
  local body = '{"title": "bench ' .. counter .. '", "tags": ["bench"]}'
  return wrk.format("POST", nil, headers, body)
end
"""

_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


@dataclass(frozen=True)
class WrkResult:
    requests_per_second: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int  # socket errors + non-2xx/3xx responses
    client_cpu_seconds: float = 0.0  # wrk's own user + system time


def _ms(value: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", value.strip())
    if not match:
        raise ValueError(f"unparseable wrk latency {value!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def parse(output: str) -> WrkResult:
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))  # type: ignore[union-attr]
    total = int(re.search(r"(\d+) requests in", output).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"^\s+50%\s+(\S+)", output, re.M).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"^\s+99%\s+(\S+)", output, re.M).group(1))  # type: ignore[union-attr]
    errors = 0
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    if non_2xx:
        errors += int(non_2xx.group(1))
    socket_errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    if socket_errors:
        errors += sum(int(x) for x in socket_errors.groups())
    return WrkResult(rps, p50, p99, total, errors)


def run(
    url: str,
    *,
    connections: int = 64,
    threads: int = 2,
    duration_s: int = 10,
    headers: dict[str, str] | None = None,
    post: bool = False,
    idempotency: bool = False,
) -> WrkResult:
    wrk = find_binary("wrk") or "wrk"
    args = [wrk, f"-t{threads}", f"-c{connections}", f"-d{duration_s}s", "--latency"]
    args += ["--timeout", "5s"]
    for name, value in (headers or {}).items():
        args += ["-H", f"{name}: {value}"]
    with tempfile.TemporaryDirectory() as tmp:
        if post:
            script = Path(tmp) / "post.lua"
            flag = "true" if idempotency else "false"
            script.write_text(f"IDEMPOTENCY = {flag}\n{POST_SCRIPT}")
            args += ["-s", str(script)]
        args.append(url)
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        completed = subprocess.run(
            args, capture_output=True, text=True, timeout=duration_s + 30, check=True
        )
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = parse(completed.stdout)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return dataclasses.replace(result, client_cpu_seconds=cpu)
