"""What Redis's persistence settings cost a submit, and what they keep when Redis dies.

    python bench_queues.py            # the full run behind notes/queues.md (about 1.5 minutes)
    python bench_queues.py --quick    # tiny counts, under a minute: it works, not how fast

Every measurement runs against a redis-server this script starts itself, on a free loopback
port, with its data directory in a fresh temporary directory (`--dir PARENT` to put it on
another disk), and stops by its process group. Five settings:

    off       --appendonly no  --save ""                   nothing on disk at all
    no        --appendonly yes --appendfsync no            write() before replying, the OS flushes
    everysec  --appendonly yes --appendfsync everysec      write() before replying, fsync every 1 s
    always    --appendonly yes --appendfsync always        write() and fsync() before replying

(every one with `--save ""`: no snapshots, so the append-only file is all there is.)

1. disk: where the temporary directory is (`df -T`) and what one small fsync costs there.
2. submit: chapter 02's SUBMIT script (copied below, not imported) through redis.asyncio on
   uvloop (as chapter 02's proxy), at concurrency 1 and 50: submits/s, p50 and p99 latency,
   append-only bytes and redis-server CPU per submit.
   Three rounds, the order of the settings rotated each round; the median round is quoted.
3. crash: 50 clients submit until N jobs are acknowledged, then redis-server gets SIGKILL with
   submits still in flight; it is restarted on the same directory and every acknowledged job is
   looked for. A clean restart (SIGTERM) of `off` too.

A power cut, or a kernel crash, which is where `no` and `everysec` can lose acknowledged
writes, cannot be made from inside this machine: section 3 only kills the process.

Prints a table per section; the last line is one JSON object of headline figures. Exits 1 if a
submit failed or an acknowledged job was missing where the append-only file should have kept it.
"""

import argparse
import asyncio
import contextlib
import json
import os
import platform
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import redis
import redis.asyncio
import uvloop
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

# Chapter 02's SUBMIT (02_asynchronous/jobs.py), verbatim: the same Redis work as one
# POST /predict, without the proxy's HTTP in front of it.
SUBMIT = """
-- KEYS: status, data, queue, recent, submitted   ARGV: id, rows, ttl, priority, max queue,
-- max recent
-- Returns 1: queued, 0: id taken by another job, -1: queue full.
if redis.call('EXISTS', KEYS[1]) == 1 then
  -- Same id and same rows: redis-py retried this very call after its answer was lost, and the
  -- first attempt went through. That job is ours; anything else is a collision.
  if redis.call('GET', KEYS[2]) == ARGV[2] then return 1 end
  return 0  -- never overwrite
end
if redis.call('LLEN', KEYS[3]) >= tonumber(ARGV[5]) then return -1 end
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local ttl = tonumber(ARGV[3])
redis.call('SET', KEYS[2], ARGV[2], 'EX', ttl)
redis.call('SET', KEYS[1], 'pending', 'EX', ttl)
redis.call('SET', KEYS[5], t[1] .. string.format('%06d', t[2]), 'EX', ttl)  -- us
if ARGV[4] == 'high' then
  redis.call('RPUSH', KEYS[3], ARGV[1])
else
  redis.call('LPUSH', KEYS[3], ARGV[1])
end
redis.call('ZADD', KEYS[4], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now - ttl * 1000)
redis.call('ZREMRANGEBYRANK', KEYS[4], 0, -tonumber(ARGV[6]) - 1)
redis.call('EXPIRE', KEYS[4], ttl)
return 1
"""
QUEUE = "queue:predict"
RECENT = "jobs:recent"
ROWS = json.dumps([[5.9, 3.0, 5.1, 1.8]])  # one Iris row, as chapter 02's bench submits
TTL = 86400  # JOB_TTL's default
MAX_RECENT = 10_000  # jobs.MAX_RECENT
# Chapter 02 refuses submits past MAX_QUEUE (10,000) waiting jobs; nothing drains the queue
# here, so the limit is raised out of reach. The LLEN that checks it runs all the same.
MAX_QUEUE = 1_000_000_000

SETTINGS: dict[str, list[str]] = {
    "off": ["--appendonly", "no"],
    "no": ["--appendonly", "yes", "--appendfsync", "no"],
    "everysec": ["--appendonly", "yes", "--appendfsync", "everysec"],
    "always": ["--appendonly", "yes", "--appendfsync", "always"],
}


@dataclass(frozen=True)
class Sizes:
    rounds: int  # submit rounds per setting
    submits: dict[int, int]  # concurrency -> submits per round
    seconds: float  # cap of one submit measurement: the run always ends
    crash_acked: int  # acknowledged jobs before the SIGKILL
    crash_rounds: int
    fsyncs: int


FULL = Sizes(3, {1: 2_000, 50: 20_000}, 10.0, 5_000, 3, 200)
QUICK = Sizes(1, {1: 100, 50: 500}, 5.0, 200, 1, 20)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class RedisServer:
    """One redis-server process in its own session, on `directory`, stopped by its group."""

    def __init__(self, directory: Path, setting: str):
        self.directory = directory
        self.setting = setting
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1"]
        args += ["--dir", str(self.directory), "--save", "", "--daemonize", "no"]
        args += ["--logfile", str(self.directory / "redis.log"), *SETTINGS[self.setting]]
        self.proc = subprocess.Popen(args, start_new_session=True, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        client = redis.Redis(port=self.port, socket_connect_timeout=1, socket_timeout=2)
        try:
            while True:
                try:
                    client.ping()  # LOADING (replaying the file) is an error too: wait it out
                    return
                except redis.RedisError:
                    if self.proc.poll() is not None or time.monotonic() > deadline:
                        log = (self.directory / "redis.log").read_text(errors="replace")
                        raise RuntimeError(f"redis-server did not start:\n{log[-2000:]}") from None
                    time.sleep(0.05)
        finally:
            client.close()

    def signal(self, signum: int) -> None:
        """Send `signum` to the server's process group and wait until the server is gone."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signum)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None

    def cpu_seconds(self) -> float:
        """User + system CPU the server has used so far (all its threads), from /proc."""
        assert self.proc is not None
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def aof_bytes(self) -> int:
        """Size of everything in the append-only directory (Redis 7: base + incr files)."""
        files = (self.directory / "appendonlydir").glob("*")
        return sum(f.stat().st_size for f in files if f.is_file())


@contextlib.contextmanager
def server(parent: Path | None, setting: str) -> Iterator[RedisServer]:
    directory = Path(tempfile.mkdtemp(prefix=f"bench-queues-{setting}-", dir=parent))
    srv = RedisServer(directory, setting)
    try:
        srv.start()
        yield srv
    finally:
        srv.signal(signal.SIGTERM)
        shutil.rmtree(directory, ignore_errors=True)


def client(port: int, connections: int) -> redis.asyncio.Redis:
    # No client-side retries: every failure is counted, none is hidden by a second attempt.
    return redis.asyncio.Redis(
        port=port,
        decode_responses=True,
        max_connections=connections,
        socket_timeout=10,
        retry=Retry(NoBackoff(), 0),
    )


def submit_args(job_id: str) -> tuple[list[str], list[str | int]]:
    keys = [f"job:{job_id}:status", f"job:{job_id}:data", QUEUE, RECENT, f"job:{job_id}:submitted"]
    return keys, [job_id, ROWS, TTL, "normal", MAX_QUEUE, MAX_RECENT]


def new_job_id() -> str:
    return secrets.token_hex(5)  # as chapter 02's jobs.new_job_id


def percentile(ordered: list[float], q: float) -> float:
    return ordered[max(0, min(len(ordered) - 1, round(q * len(ordered)) - 1))]


@dataclass
class Load:
    setting: str
    concurrency: int
    submits: int
    errors: int
    seconds: float
    p50_ms: float
    p99_ms: float
    aof_bytes_per_submit: float
    server_cpu_us: float  # redis-server's CPU per submit
    client_cpu_us: float  # this process's CPU per submit (redis-py, the event loop)
    delayed_fsyncs: int  # everysec: writes that waited 2 s for a slow fsync, then went ahead

    @property
    def rate(self) -> float:
        return self.submits / self.seconds


async def submit_load(srv: RedisServer, concurrency: int, total: int, cap: float) -> Load:
    r = client(srv.port, concurrency)
    script = r.register_script(SUBMIT)
    latencies: list[float] = []
    errors = 0

    async def one() -> None:
        nonlocal errors
        keys, args = submit_args(new_job_id())
        started = time.perf_counter()
        done = await script(keys=keys, args=args)
        latencies.append(time.perf_counter() - started)
        errors += done != 1

    async def loop(n: int, deadline: float) -> None:
        for _ in range(n):
            if time.monotonic() > deadline:
                return
            await one()

    try:
        # Warm-up at full concurrency: every connection open and the script loaded first.
        await asyncio.gather(*(loop(3, time.monotonic() + cap) for _ in range(concurrency)))
        latencies.clear()
        errors = 0
        before, cpu_before, own_before = srv.aof_bytes(), srv.cpu_seconds(), time.process_time()
        delayed_before = int((await r.info("persistence")).get("aof_delayed_fsync", 0))
        started = time.perf_counter()
        deadline = time.monotonic() + cap
        await asyncio.gather(*(loop(total // concurrency, deadline) for _ in range(concurrency)))
        seconds = time.perf_counter() - started
        grown, cpu = srv.aof_bytes() - before, srv.cpu_seconds() - cpu_before
        own = time.process_time() - own_before
        delayed = int((await r.info("persistence")).get("aof_delayed_fsync", 0)) - delayed_before
    finally:
        await r.aclose()
    latencies.sort()
    return Load(
        srv.setting,
        concurrency,
        len(latencies),
        errors,
        seconds,
        percentile(latencies, 0.50) * 1000,
        percentile(latencies, 0.99) * 1000,
        grown / len(latencies),
        cpu / len(latencies) * 1e6,
        own / len(latencies) * 1e6,
        delayed,
    )


@dataclass
class Crash:
    setting: str
    how: str  # "SIGKILL" or "SIGTERM"
    acked: int = 0
    survived: int = 0
    in_flight: int = 0  # submits sent, never answered: the server died first
    in_flight_kept: int = 0  # of those, found after the restart (the script ran, the reply died)
    errors: list[str] = field(default_factory=list)

    @property
    def lost(self) -> int:
        return self.acked - self.survived


async def submit_until_killed(
    srv: RedisServer, acked_target: int, how: int, concurrency: int = 50
) -> tuple[list[str], list[str], list[str]]:
    """Submit from `concurrency` clients; once `acked_target` jobs are acknowledged, signal the
    server with the others' submits still in flight. Returns (acked, unanswered, errors)."""
    r = client(srv.port, concurrency)
    script = r.register_script(SUBMIT)
    acked: list[str] = []
    unanswered: list[str] = []
    errors: list[str] = []
    signalled = False

    async def submitter() -> None:
        nonlocal signalled
        while not signalled:
            job_id = new_job_id()
            keys, args = submit_args(job_id)
            try:
                done = await script(keys=keys, args=args)
            except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
                if signalled:
                    unanswered.append(job_id)
                    return
                errors.append(repr(exc))
                return
            if done != 1:
                errors.append(f"SUBMIT answered {done}")
                continue
            acked.append(job_id)  # a reply came back: Redis ran the script
            if len(acked) >= acked_target and not signalled:
                signalled = True
                assert srv.proc is not None
                os.killpg(srv.proc.pid, how)  # at once, from inside the loop: others in flight

    try:
        await asyncio.gather(*(submitter() for _ in range(concurrency)))
    finally:
        # The connections are dead; closing them must not fail the run.
        with contextlib.suppress(redis.RedisError, OSError):
            await r.aclose()
    return acked, unanswered, errors


def crash(parent: Path | None, setting: str, acked_target: int, how: int) -> Crash:
    name = "SIGKILL" if how == signal.SIGKILL else "SIGTERM"
    result = Crash(setting, name)
    with server(parent, setting) as srv:
        # Recovery must not depend on the script cache, nor on anything but the directory.
        acked, unanswered, errors = uvloop.run(submit_until_killed(srv, acked_target, how))
        assert srv.proc is not None
        srv.proc.wait(timeout=30)
        srv.proc = None
        srv.start()  # same port, same directory, same settings
        check = redis.Redis(port=srv.port, decode_responses=True)
        try:
            queued = set(check.lrange(QUEUE, 0, -1))
            with check.pipeline(transaction=False) as pipe:
                for job_id in acked:
                    pipe.get(f"job:{job_id}:status")
                    pipe.exists(f"job:{job_id}:data")
                found = pipe.execute()
            with check.pipeline(transaction=False) as pipe:
                for job_id in unanswered:
                    pipe.exists(f"job:{job_id}:status")
                kept = pipe.execute()
        finally:
            check.close()
    statuses, has_data = found[::2], found[1::2]
    result.acked = len(acked)
    result.survived = sum(
        status == "pending" and data == 1 and job_id in queued
        for job_id, status, data in zip(acked, statuses, has_data, strict=True)
    )
    result.in_flight = len(unanswered)
    result.in_flight_kept = sum(kept)
    result.errors = errors
    return result


def fsync_probe(directory: Path, n: int) -> tuple[float, float]:
    """p50 and p99 ms of one 200-byte append plus fsync: what `always` adds per event loop turn."""
    path = directory / "fsync-probe"
    times = []
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for _ in range(n):
            started = time.perf_counter()
            os.write(fd, b"x" * 200)
            os.fsync(fd)
            times.append(time.perf_counter() - started)
    finally:
        os.close(fd)
        path.unlink()
    times.sort()
    return percentile(times, 0.5) * 1000, percentile(times, 0.99) * 1000


def describe_disk(directory: Path) -> str:
    out = subprocess.run(["df", "-T", str(directory)], capture_output=True, text=True, check=True)
    device, fstype = out.stdout.splitlines()[1].split()[:2]
    return f"{device} {fstype}"


def machine() -> dict[str, str | int | None]:
    pretty = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                pretty = line.split("=", 1)[1].strip('"')
    version = subprocess.run(["redis-server", "--version"], capture_output=True, text=True)
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "os": pretty,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "redis": version.stdout.split()[2].removeprefix("v="),
        "load": " ".join(f"{x:.1f}" for x in os.getloadavg()),
    }


def median_round(loads: list[Load]) -> Load:
    return sorted(loads, key=lambda load: load.rate)[len(loads) // 2]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny counts, under a minute")
    parser.add_argument("--dir", type=Path, help="parent of the Redis data directories")
    opts = parser.parse_args()
    sizes = QUICK if opts.quick else FULL
    if shutil.which("redis-server") is None:
        sys.exit("bench_queues: redis-server not found (apt-get install redis-server)")
    started = time.monotonic()
    facts = machine()
    probe_dir = Path(tempfile.mkdtemp(prefix="bench-queues-disk-", dir=opts.dir))
    try:
        disk = describe_disk(probe_dir)
        fsync_p50, fsync_p99 = fsync_probe(probe_dir, sizes.fsyncs)
    finally:
        shutil.rmtree(probe_dir, ignore_errors=True)
    print(f"{facts['date']}; {facts['os']}, {facts['cores']} cores, Python {facts['python']},")
    print(f"redis-server {facts['redis']}; load average at start {facts['load']}")
    print("\n1. disk under the append-only files")
    print(f"   {disk}; one 200-byte append + fsync: p50 {fsync_p50:.2f} ms, p99 {fsync_p99:.2f} ms")

    loads: dict[tuple[str, int], list[Load]] = {}
    order = list(SETTINGS)
    for round_ in range(sizes.rounds):
        # Rotated each round, so a quiet or a busy minute on the shared machine is spread out.
        for setting in order[round_ % len(order) :] + order[: round_ % len(order)]:
            with server(opts.dir, setting) as srv:
                for concurrency, total in sizes.submits.items():
                    load = uvloop.run(submit_load(srv, concurrency, total, sizes.seconds))
                    loads.setdefault((setting, concurrency), []).append(load)

    print(f"\n2. submit (chapter 02's SUBMIT script), the median of {sizes.rounds} round(s)")
    print("   per submit: AOF bytes appended, CPU of redis-server and of this (client) process")
    print(
        f"   {'setting':<10}{'clients':>8}{'submits':>9}{'rate /s':>9}{'p50 ms':>8}{'p99 ms':>8}"
        f"{'AOF B':>7}{'CPU us: Redis':>14}{'client':>7}  rates of every round"
    )
    failures: list[str] = []
    chosen: dict[tuple[str, int], Load] = {}
    for (setting, concurrency), runs in loads.items():
        m = chosen[setting, concurrency] = median_round(runs)
        rates = ", ".join(f"{run.rate:.0f}" for run in runs)
        print(
            f"   {setting:<10}{concurrency:>8}{m.submits:>9}{m.rate:>9.0f}{m.p50_ms:>8.2f}"
            f"{m.p99_ms:>8.2f}{m.aof_bytes_per_submit:>7.0f}{m.server_cpu_us:>14.0f}"
            f"{m.client_cpu_us:>7.0f}  {rates}"
        )
        failures += [f"{setting} c{concurrency}: {run.errors} errors" for run in runs if run.errors]
    delayed = sum(run.delayed_fsyncs for runs in loads.values() for run in runs)
    print(f"   everysec writes that waited for a slow fsync (aof_delayed_fsync): {delayed}")

    crashes: list[Crash] = []
    for _ in range(sizes.crash_rounds):
        for setting in SETTINGS:
            crashes.append(crash(opts.dir, setting, sizes.crash_acked, signal.SIGKILL))
    crashes.append(crash(opts.dir, "off", sizes.crash_acked, signal.SIGTERM))

    print("\n3. redis-server stopped under load (50 clients), restarted on the same directory")
    print(
        f"   {'setting':<10}{'stopped by':>11}{'acked':>8}{'survived':>9}{'lost':>7}"
        f"{'in flight':>10}{'of those kept':>14}"
    )
    for c in crashes:
        print(
            f"   {c.setting:<10}{c.how:>11}{c.acked:>8}{c.survived:>9}{c.lost:>7}"
            f"{c.in_flight:>10}{c.in_flight_kept:>14}"
        )
        failures += [f"{c.setting} {c.how}: {e}" for e in c.errors]
        if c.setting != "off" and c.lost:
            failures.append(f"{c.setting} {c.how}: {c.lost} acknowledged jobs lost")
        if c.setting == "off" and c.survived:
            failures.append(f"off {c.how}: {c.survived} jobs survived with nothing on disk?")
    elapsed = time.monotonic() - started
    print("\n   in flight: sent, no reply before the server died; kept: in Redis after the")
    print("   restart all the same (the script ran, its reply was lost: why SUBMIT is idempotent)")
    print(f"\nran {elapsed:.0f} s; {'FAILED: ' + '; '.join(failures) if failures else 'ok'}")

    by_setting: dict[str, list[Crash]] = {}
    for c in crashes:
        if c.how == "SIGKILL":
            by_setting.setdefault(c.setting, []).append(c)
    headline: dict[str, object] = {
        "bench": "notes/queues",
        "date": facts["date"],
        "machine": f"{facts['cores']} cores, {facts['os']}, Python {facts['python']}",
        "redis": facts["redis"],
        "disk": disk,
        "fsync_p50_ms": round(fsync_p50, 2),
        "fsync_p99_ms": round(fsync_p99, 2),
    }
    for (setting, concurrency), m in chosen.items():
        headline[f"{setting}_c{concurrency}_rps"] = round(m.rate)
        headline[f"{setting}_c{concurrency}_p50_ms"] = round(m.p50_ms, 2)
        headline[f"{setting}_c{concurrency}_p99_ms"] = round(m.p99_ms, 2)
        headline[f"{setting}_c{concurrency}_redis_cpu_us"] = round(m.server_cpu_us)
        headline[f"{setting}_c{concurrency}_client_cpu_us"] = round(m.client_cpu_us)
    for setting, kills in by_setting.items():
        headline[f"{setting}_sigkill_acked"] = sum(c.acked for c in kills)
        headline[f"{setting}_sigkill_lost"] = sum(c.lost for c in kills)
    headline["off_sigterm_lost"] = crashes[-1].lost
    headline["seconds"] = round(elapsed)
    headline["ok"] = not failures
    print(json.dumps(headline))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
