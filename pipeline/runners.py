"""Runners execute shard jobs and stream their events to the driver: in-process (no Ray; comparisons
and tiny jobs) or on Ray (CPU decode tasks, long-lived model actors, one writer task per shard).

Both retry a shard whose attempt failed for a reason a retry can fix (a worker died, a transient I/O
error), up to `shard_retries` times; a shard that still fails is reported as ShardFailed and stays
pending in the store (never half-written: the store only sees a shard once its ledger is committed).
A full disk or a bug of ours (an exception that is no decode, model-input or I/O error) stops the job
instead (JobStopped): retrying cannot fix it, and it must not fill the ledger with failures.
"""
from __future__ import annotations

import atexit
import errno
import json
import logging
import multiprocessing
import os
import signal
import sys
import time
import traceback
import uuid
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures import TimeoutError as FuturesTimeout
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

from extractors.backends import BackendUnavailable
from pipeline.config import ConfigError, JobConfig, RunConfig
from pipeline.shard import ShardJob, ShardProgress, ShardResult, process_shard
from pipeline.work import Decoded, DecodeStatus, Decoder, Encoded, ModelRunner, VideoTask, encode_isolating_crashes
from stores.schema import Dims

log = logging.getLogger(__name__)


@dataclass
class ShardRetry:
    index: int
    attempt: int  # the attempt that failed (1-based)
    error: str
    undo_ok: int  # progress of the failed attempt, to take back from the bar
    undo_failed: int


@dataclass
class ShardFailed:
    index: int
    attempts: int
    error: str


Event = ShardProgress | ShardResult | ShardRetry | ShardFailed


class JobStopped(Exception):
    """The job cannot go on; committed shards stay as they are. `exit_code` is what the CLI returns."""

    exit_code = 2


class DiskFull(JobStopped):
    exit_code = 1


class WorkerBug(JobStopped):
    """An exception that is neither a decode, model-input nor I/O error: a bug, with its traceback."""

    exit_code = 2

    def __init__(self, message: str, trace: str) -> None:
        super().__init__(message)
        self.trace = trace


def _root_cause(error: BaseException) -> BaseException:
    """The user exception inside Ray's wrappers (a task's error re-raised by the task that waited on it)."""
    ray = sys.modules.get("ray")
    while ray is not None and isinstance(error, ray.exceptions.RayTaskError) and error.cause is not None:
        if error.cause is error:
            break
        error = error.cause
    return error


def _is_infrastructure(error: BaseException) -> bool:
    """A worker, actor, node or object lost: the work itself is fine, a retry redoes it."""
    ray = sys.modules.get("ray")
    if ray is None:
        return False
    x = ray.exceptions
    kinds = (x.RayActorError, x.WorkerCrashedError, x.ObjectLostError, x.NodeDiedError, x.TaskCancelledError,
             x.GetTimeoutError, x.RaySystemError, x.ObjectFetchTimedOutError, x.OutOfMemoryError)
    return isinstance(error, kinds) and not isinstance(error, x.RayTaskError)


def check_shard_error(error: BaseException, out: str) -> None:
    """Return when a retry of the shard may fix `error`; raise JobStopped when it must stop the job."""
    cause = _root_cause(error)
    if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):
        where = cause.filename or out
        raise DiskFull(f"no space left on device in {out} ({cause.strerror}: {where}); free space, then rerun "
                       f"to resume") from None
    if _is_infrastructure(error) or _is_infrastructure(cause) or isinstance(cause, OSError):
        return
    if isinstance(cause, BackendUnavailable):  # no video can decode here (e.g. a tar member, backend not pyav)
        raise JobStopped(f"{cause}; the job stopped, committed shards are kept") from None
    trace = str(error) if error is not cause else "".join(traceback.format_exception(error))
    raise WorkerBug(f"a shard worker raised {type(cause).__name__}: {cause}; this is a bug, not a bad video: "
                    f"the job stopped, committed shards are kept", trace) from None


class _Attempts:
    """Per-shard attempt counting and progress bookkeeping shared by both runners."""

    def __init__(self, retries: int, out: str) -> None:
        self.retries = retries
        self.out = out
        self.attempt: dict[int, int] = {}
        self.progress: dict[int, list[int]] = {}

    def start(self, index: int) -> None:
        self.attempt[index] = self.attempt.get(index, 0) + 1
        self.progress[index] = [0, 0]

    def seen(self, event: ShardProgress) -> None:
        self.progress[event.index][0] += event.ok
        self.progress[event.index][1] += event.failed

    def failed(self, index: int, error: BaseException) -> tuple[Event, bool]:
        """The event for a failed attempt, and whether to try again (JobStopped if nothing may)."""
        check_shard_error(error, self.out)
        message = f"{type(error).__name__}: {error}".strip()
        attempt = self.attempt[index]
        if attempt > self.retries:
            log.error("shard %d failed after %d attempts: %s", index, attempt, message)
            return ShardFailed(index, attempt, message), False
        log.warning("shard %d attempt %d failed, retrying: %s", index, attempt, message)
        ok, failed = self.progress[index]
        return ShardRetry(index, attempt, message, ok, failed), True


def model_threads(run: RunConfig) -> int:
    """Torch threads of a model holder, the same for both runners: on CPU the thread count changes
    the bits of a forward pass, and a resumed or compared run must reproduce them."""
    return run.actor_threads or max(1, int(run.actor_cpus))


class ModelProcess:
    """The local runner's models in one child process (concurrent.futures, forkserver): a fatal signal
    in a model (a poison video, a driver fault) or a hung forward pass kills the child, not the job. The
    child is replaced; `encode` then says why it died instead of returning an Encoded. Exceptions raised
    by the models come back as themselves (ValueError, TypeError, ...), with the child's traceback as
    their __cause__."""

    def __init__(self, extractor: dict, device: str, threads: int, timeout_s: float) -> None:
        self.args = (extractor, device, threads)
        self.timeout_s = timeout_s
        self.key = ""  # set by shared_model_process
        self.pool: ProcessPoolExecutor | None = None
        self.pid = 0
        self.dims = self._start()

    def _start(self) -> Dims:
        self.pid = 0
        self.pool = ProcessPoolExecutor(1, mp_context=_model_context())
        wait = max(300.0, 2 * self.timeout_s)  # as the Ray runner waits for its actors' models
        try:
            self.pid = self.pool.submit(os.getpid).result(timeout=wait)
            dims = self.pool.submit(_child_build, *self.args).result(timeout=wait)
        except FuturesTimeout as e:
            if self.pid:
                os.kill(self.pid, signal.SIGKILL)
            self.close()
            raise ConfigError(f"the model process did not build the models within {wait:g} s (a GPU that hangs?)") from e
        except BrokenProcessPool as e:
            why = fault_report(self.pid) if self.pid else "it died before reporting its pid"
            self.close()
            raise ConfigError(f"the model process died while building the models: {why}") from e
        except BaseException:
            self.close()
            raise
        return dims

    def encode(self, batch: list[Decoded]) -> Encoded | str:
        try:  # submit too: a child killed while idle (the OOM killer) breaks the pool before the call
            return self.pool.submit(_child_encode, batch).result(timeout=self.timeout_s)
        except FuturesTimeout:
            os.kill(self.pid, signal.SIGKILL)
            why = f"model worker timed out: no result within {self.timeout_s:g} s; the process was killed"
        except BrokenProcessPool:
            why = f"model worker crashed: {fault_report(self.pid)}"
        log.warning("model process %d: %s; starting a new one", self.pid, why)
        self.close()
        self._start()
        return why

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None


def _model_context() -> multiprocessing.context.BaseContext:
    """forkserver: a clean single-threaded server process imports torch and our modules once, and every
    model process forks from it (a restart after a crash costs a model build, not a torch import; fork
    from this process could inherit held locks of its threads)."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torchvision", "pipeline.work", "extractors"])
    return ctx


_CHILD_MODEL: ModelRunner | None = None  # the ModelRunner of a ModelProcess child
_SHARED: ModelProcess | None = None  # the last local job's model process, kept for the next one


def shared_model_process(extractor: dict, device: str, threads: int, timeout_s: float) -> ModelProcess:
    """The model process for a local job, kept for the next local job of this process with the same
    models (tests run many): a fresh one costs a model build and first passes, ~1.5 s of CPU for the tiny
    models. The key holds the size and mtime of every file the extractor config names, so that a
    changed weights file is loaded again."""
    global _SHARED
    key = json.dumps([extractor, device, threads, _file_stamps(extractor)], sort_keys=True, default=str)
    if _SHARED is not None and _SHARED.key == key:
        _SHARED.timeout_s = timeout_s
        return _SHARED
    if _SHARED is not None:
        _SHARED.close()
        _SHARED = None
    _SHARED = ModelProcess(extractor, device, threads, timeout_s)
    _SHARED.key = key
    return _SHARED


def _file_stamps(value: Any) -> list:
    if isinstance(value, dict):
        return [_file_stamps(v) for _, v in sorted(value.items())]
    if isinstance(value, (list, tuple)):
        return [_file_stamps(v) for v in value]
    if isinstance(value, str) and value and os.path.isfile(value):
        st = os.stat(value)
        return [value, st.st_size, st.st_mtime_ns]
    return []


@atexit.register
def _close_shared() -> None:
    if _SHARED is not None:
        _SHARED.close()


def _child_build(extractor: dict, device: str, threads: int) -> Dims:
    global _CHILD_MODEL
    _enable_fault_report()  # a fatal signal is named in a file its parent reads (fault_report)
    _CHILD_MODEL = ModelRunner(extractor, device, threads)
    return _CHILD_MODEL.dims


def _child_encode(batch: list[Decoded]) -> Encoded:
    return _CHILD_MODEL(batch)


class LocalExecutor:
    """Decodes in this process's killable decoder child and encodes in the model process, when asked:
    decode handles are the results themselves."""

    def __init__(self, decoder: Decoder, model: ModelProcess) -> None:
        self.decoder = decoder
        self.model = model

    def submit_decode(self, task: VideoTask) -> tuple[DecodeStatus, Decoded | None]:
        return self.decoder(task)

    def decode_status(self, handle: tuple[DecodeStatus, Decoded | None]) -> DecodeStatus:
        return handle[0]

    def submit_encode(self, handles: list[tuple[DecodeStatus, Decoded | None]], batch_index: int) -> list[Decoded]:
        return [decoded for _, decoded in handles]

    def encoded(self, batch: list[Decoded]) -> Encoded:
        return encode_isolating_crashes([d.row for d in batch], batch, self.model.encode(batch),
                                        lambda _, part: self.model.encode(part))


class LocalRunner:
    """A plain loop over shards in this process, the models in one child: the reference the Ray runner
    is measured against."""

    def __init__(self, config: JobConfig) -> None:
        from extractors.config import ExtractorConfig

        run = config.run
        extractor = ExtractorConfig.from_dict(config.extractor)
        try:
            self.model = shared_model_process(config.extractor, run.device, model_threads(run),
                                              run.encode_timeout(extractor.num_frames))
        except (OSError, ValueError) as e:  # a missing or unreadable weights file, a model the config cannot build
            raise ConfigError(f"could not build the models: {type(e).__name__}: {e}") from e
        decoder = Decoder(extractor.sampling, run.timeout_s, extractor.regions.kind == "given", run.io_retries,
                          run.io_backoff_s)
        self.executor = LocalExecutor(decoder, self.model)
        self.retries = run.shard_retries
        self.out = run.out

    @property
    def dims(self) -> Dims:
        return self.model.dims

    def run(self, jobs: Iterable[ShardJob]) -> Iterator[Event]:
        attempts = _Attempts(self.retries, self.out)
        for job in jobs:
            while True:
                attempts.start(job.spec.index)
                try:
                    for event in process_shard(job, self.executor):
                        if isinstance(event, ShardProgress):
                            attempts.seen(event)
                        yield event
                    break
                except Exception as e:
                    event, again = attempts.failed(job.spec.index, e)
                    yield event
                    if not again:
                        break

    def close(self) -> None:
        """The model process stays for the next local job of this process (shared_model_process)."""


# ---------------------------------------------------------------- Ray
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}


def ray_init(address: str, num_cpus: int) -> bool:
    """Join `address` (or $RAY_ADDRESS), else start an embedded Ray bound to loopback. Returns True when
    this process started Ray (and must shut it down)."""
    address = address or os.environ.get("RAY_ADDRESS", "")
    if not address:
        # Ray 2.60 reads these when it is imported: set them first. Without the first, Ray binds every
        # interface; the second turns token auth off, which only a loopback-only embedded cluster may do.
        if "ray" in sys.modules and any(os.environ.get(k) != v for k, v in LOOPBACK_ENV.items()):
            log.warning("ray was imported before its loopback settings were made (%s): set them in the environment "
                        "of this process so that the embedded Ray stays on 127.0.0.1", LOOPBACK_ENV)
        os.environ.update(LOOPBACK_ENV)
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    if ray.is_initialized():  # a caller (a test, a notebook) runs Ray already: use it, leave it running
        _check_same_cluster(ray, address)
        return False
    if address:
        host = address.split("://")[-1].rsplit(":", 1)[0]
        if host not in ("127.0.0.1", "localhost", "::1") and os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") == "0":
            # With it, Ray advertises this driver at 127.0.0.1: remote nodes could never reach it.
            raise ConfigError(
                f"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 keeps Ray on loopback, so this driver cannot join the cluster at "
                f"{address}; unset it (and RAY_AUTH_MODE on a cluster with authentication) and run "
                f"`.venv/bin/vlpcache extract ... --ray-address {address}`"
            )
        log.info("joining the Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=True)
        return True
    ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=False,
             _node_ip_address="127.0.0.1", log_to_driver=True)
    return True


def _check_same_cluster(ray: Any, address: str) -> None:
    """An already initialised Ray must be the cluster asked for: work sent elsewhere would be a surprise."""
    if not address or address in ("auto", "local"):
        return
    current = ray.get_runtime_context().gcs_address or ""
    want = address.split("://")[-1]
    host, _, port = want.rpartition(":")
    alias = {"localhost": "127.0.0.1"}
    if (alias.get(host, host), port) != tuple(alias.get(p, p) for p in current.rsplit(":", 1)):
        raise ConfigError(f"Ray is already initialised in this process on the cluster at {current}, not at "
                          f"--ray-address {address}; call ray.shutdown() first, or drop --ray-address")


KV_NAMESPACE = "vlpcache"
FAULT_DIR = "vlpcache-faults"  # under the temp dir of a model actor's node: its faulthandler reports


def _kv():
    from ray.experimental import internal_kv

    return internal_kv


class _ModelActor:
    """A long-lived holder of the frame encoder + region source; batches of many videos come to it.

    Before a forward pass it records "call TOKEN started" in Ray's key-value store (GCS): when the actor
    dies, the caller of the call that was running tells itself apart from the callers whose calls only
    waited in the queue, and only the former isolates its batch (RayExecutor.encoded)."""

    def __init__(self, extractor: dict, device: str, threads: int, job_id: str, index: int) -> None:
        import warnings

        # Frames arrive as read-only views of Ray's object store; the models only read them.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        self.key = f"{job_id}/actor{index}"
        self._fault_file = _enable_fault_report()
        self.runner = ModelRunner(extractor, device, threads)

    def dims(self) -> Dims:
        return self.runner.dims

    def pid(self) -> int:
        return os.getpid()

    def encode(self, token: str, *decoded: Decoded) -> Encoded:
        # Ray resolves top-level ObjectRef arguments: the frames come straight from the decode workers.
        kv = _kv()
        started = json.dumps({"t": time.time(), "pid": os.getpid()}).encode()
        kv._internal_kv_put(token, started, namespace=KV_NAMESPACE)
        kv._internal_kv_put(self.key, json.dumps({"token": token, "t": time.time()}).encode(), namespace=KV_NAMESPACE)
        encoded = self.runner(list(decoded))
        kv._internal_kv_put(token, b"done", namespace=KV_NAMESPACE)
        return encoded

    def fault_report(self, pid: int) -> str:
        return fault_report(pid)


def fault_report(pid: int) -> str:
    """What a dead model process on this node reported as it died (faulthandler's first line)."""
    import re
    import tempfile
    from pathlib import Path

    path = Path(tempfile.gettempdir()) / FAULT_DIR / f"{pid}.txt"
    try:
        text = path.read_text()
    except OSError:
        return f"process {pid} died (no report on this node)"
    path.unlink(missing_ok=True)
    if m := re.search(r"Fatal Python error: (.+)", text):
        return m.group(1).strip()
    return f"process {pid} died with no fault report (SIGKILL, the OOM killer or an exit)"


def _enable_fault_report() -> Any:
    """faulthandler to a per-pid file: a fatal signal (SIGSEGV, SIGBUS, SIGFPE, SIGABRT, SIGILL) is named there."""
    import faulthandler
    import tempfile
    from pathlib import Path

    folder = Path(tempfile.gettempdir()) / FAULT_DIR
    folder.mkdir(exist_ok=True)
    for old in folder.glob("*.txt"):  # reports nobody asked for within a day
        if time.time() - old.stat().st_mtime > 86400:
            old.unlink(missing_ok=True)
    f = open(folder / f"{os.getpid()}.txt", "w")  # kept open: faulthandler writes to its descriptor
    faulthandler.enable(file=f)
    return f


def _decode(decoder: Decoder, task: VideoTask) -> tuple[DecodeStatus, Decoded | None]:
    return decoder(task)


def _shard_task(job: ShardJob, decoder_ref: Any, actors: list[Any], options: dict) -> Iterator[Any]:
    executor = RayExecutor(decoder_ref, actors, **options)
    yield from process_shard(job, executor)


@dataclass
class _DecodeCall:
    task: VideoTask
    status: Any  # ObjectRef[DecodeStatus]
    frames: Any  # ObjectRef[Decoded | None]
    resubmitted: bool = False


@dataclass
class _EncodeCall:
    rows: list[int]
    frames: list[Any]  # ObjectRef[Decoded] per video
    batch_index: int
    token: str
    ref: Any  # ObjectRef[Encoded]


class RayExecutor:
    """Decodes as Ray tasks (two returns: the small status, and the frames that go on to an actor);
    encodes on the model actors, round-robin by batch. Every wait has a timeout.

    When a model actor dies (Ray restarts it), the batch whose forward pass was running is retried whole
    once (an outside kill leaves the same bits), then video by video; a video that kills the actor alone
    is recorded failed ("model worker crashed: ..."). Batches that only waited in the actor's queue are
    resubmitted as they were: they lose nothing, not even a shard attempt. A forward pass longer than
    `encode_timeout_s` counts as a crash ("timed out"): the actor is killed and replaced."""

    MAX_LOST = 20  # resubmissions of one call lost with an actor before the shard attempt gives up

    def __init__(self, decoder_ref: Any, actors: list[Any], decode_options: dict, job_id: str,
                 encode_timeout_s: float, decode_wait_s: float) -> None:
        import ray

        self.decoder_ref = decoder_ref
        self.actors = actors
        self.job_id = job_id
        self.encode_timeout_s = encode_timeout_s
        self.decode_wait_s = decode_wait_s
        # Ray retries a decode whose worker died; a bad video is a result, not an exception (Decoder).
        self.decode = ray.remote(_decode).options(**decode_options, num_returns=2, max_retries=3)

    # -- decode
    def submit_decode(self, task: VideoTask) -> _DecodeCall:
        return _DecodeCall(task, *self.decode.remote(self.decoder_ref, task))

    def decode_status(self, call: _DecodeCall) -> DecodeStatus:
        import ray

        try:
            return ray.get(call.status, timeout=self.decode_wait_s)
        except ray.exceptions.GetTimeoutError:
            ray.cancel(call.status, force=True)
            if call.resubmitted:
                return DecodeStatus(call.task.row, f"decode: no result within {self.decode_wait_s:g} s, twice "
                                    f"(the decode task was cancelled)", self.decode_wait_s)
            log.warning("video %s: no decode result within %g s; cancelled, resubmitting", call.task.video_id,
                        self.decode_wait_s)
            call.status, call.frames = self.decode.remote(self.decoder_ref, call.task)
            call.resubmitted = True
            return self.decode_status(call)

    # -- encode
    def submit_encode(self, calls: list[_DecodeCall], batch_index: int) -> _EncodeCall:
        return self._submit([c.task.row for c in calls], [c.frames for c in calls], batch_index)

    def _submit(self, rows: list[int], frames: list[Any], batch_index: int) -> _EncodeCall:
        token = f"{self.job_id}/call/{uuid.uuid4().hex}"
        actor = self.actors[batch_index % len(self.actors)]
        return _EncodeCall(rows, frames, batch_index, token, actor.encode.remote(token, *frames))

    def encoded(self, call: _EncodeCall) -> Encoded:
        def attempt(rows: list[int], frames: list[Any]) -> Encoded | str:
            self._await_actor(call)  # restarted by Ray after the death
            return self._result(self._submit(rows, frames, call.batch_index))

        return encode_isolating_crashes(call.rows, call.frames, self._result(call), attempt)

    def _result(self, call: _EncodeCall) -> Encoded | str:
        """The call's Encoded, or why its forward pass killed the actor. Calls lost while waiting in the
        queue of an actor that another call killed are resubmitted here."""
        import ray

        kv = _kv()
        lost = 0
        while True:
            try:
                return self._wait(call)
            except ray.exceptions.RayActorError:
                started = kv._internal_kv_get(call.token, namespace=KV_NAMESPACE)
                killed = kv._internal_kv_get(call.token + "/killed", namespace=KV_NAMESPACE)
                self._forget(call.token)
                if killed:
                    return f"model worker timed out: no result within {self.encode_timeout_s:g} s; the actor was killed"
                if started and started != b"done":
                    return f"model worker crashed: {self._fault(call, json.loads(started)['pid'])}"
                lost += 1
                if lost > self.MAX_LOST:
                    raise  # an actor that keeps dying under others' batches: the shard attempt fails
                log.info("batch %d was lost with its model actor (another call killed it): resubmitting it",
                         call.batch_index)
                self._await_actor(call)
                call = self._submit(call.rows, call.frames, call.batch_index)

    def _await_actor(self, call: _EncodeCall) -> None:
        """Until the call's actor (restarting after a death) answers: calls sent meanwhile would fail at once."""
        import ray

        actor = self.actors[call.batch_index % len(self.actors)]
        deadline = time.monotonic() + max(300.0, 2 * self.encode_timeout_s)  # as long as a first start may take
        while True:
            try:
                ray.get(actor.pid.remote(), timeout=max(1.0, deadline - time.monotonic()))
                return
            except ray.exceptions.RayActorError:  # restarting (or its dead incarnation not yet noticed)
                if time.monotonic() > deadline:
                    raise
                time.sleep(1.0)

    def _wait(self, call: _EncodeCall) -> Encoded:
        import ray

        while True:
            ready, _ = ray.wait([call.ref], timeout=1.0)
            if ready:
                encoded = ray.get(call.ref)
                self._forget(call.token)
                return encoded
            self._kill_if_hung(call)

    def _kill_if_hung(self, call: _EncodeCall) -> None:
        """Kill the call's actor when its forward pass outlived the timeout: ours, or (at twice the
        timeout, in case its caller is gone) whichever call the actor runs while ours waits."""
        kv = _kv()
        actor_key = f"{self.job_id}/actor{call.batch_index % len(self.actors)}"
        current = kv._internal_kv_get(actor_key, namespace=KV_NAMESPACE)
        if current is None:
            return
        current = json.loads(current)
        mine = current["token"] == call.token
        if kv._internal_kv_get(current["token"], namespace=KV_NAMESPACE) in (None, b"done"):
            return
        limit = self.encode_timeout_s * (1 if mine else 2)
        if time.time() - current["t"] <= limit or kv._internal_kv_get(current["token"] + "/killed", namespace=KV_NAMESPACE):
            return
        import ray

        log.warning("model actor of batch %d: a forward pass has run %.0f s (> %g s): killing and replacing the actor",
                    call.batch_index, time.time() - current["t"], self.encode_timeout_s)
        kv._internal_kv_put(current["token"] + "/killed", b"1", namespace=KV_NAMESPACE)
        ray.kill(self.actors[call.batch_index % len(self.actors)], no_restart=False)

    def _fault(self, call: _EncodeCall, pid: int) -> str:
        """The dead actor's fault report, read by its replacement (same node on one machine)."""
        import ray

        actor = self.actors[call.batch_index % len(self.actors)]
        for _ in range(10):
            self._await_actor(call)
            try:
                return ray.get(actor.fault_report.remote(pid), timeout=self.encode_timeout_s)
            except ray.exceptions.RayActorError:  # it died again in between: ask its next replacement
                time.sleep(1.0)
            except ray.exceptions.GetTimeoutError:
                break
        return f"process {pid} died"

    @staticmethod
    def _forget(token: str) -> None:
        kv = _kv()
        for key in (token, token + "/killed"):
            kv._internal_kv_del(key, namespace=KV_NAMESPACE)


class RayRunner:
    """Shards as streaming Ray tasks (num_cpus=0: a writer mostly waits), at most `concurrent_shards`
    at once; decode tasks and model actors do the compute."""

    def __init__(self, config: JobConfig) -> None:
        from extractors.config import ExtractorConfig

        self.run_config = run = config.run
        self.actors: list[Any] = []
        self.live: dict[Any, ShardJob] = {}
        self.job_id = uuid.uuid4().hex[:12]  # keys of this job's encode calls in Ray's key-value store
        self.started = ray_init(run.ray_address, run.num_cpus)
        try:
            self._dims = self._start_actors(config)
        except BaseException:
            self.close()
            raise
        extractor = ExtractorConfig.from_dict(config.extractor)
        decoder = Decoder(extractor.sampling, run.timeout_s, extractor.regions.kind == "given", run.io_retries,
                          run.io_backoff_s)
        import ray

        self.decoder_ref = ray.put(decoder)
        self.shard_task = ray.remote(_shard_task).options(num_cpus=0, max_retries=0)
        self.executor_options = {"decode_options": {"num_cpus": run.decode_cpus}, "job_id": self.job_id,
                                 "encode_timeout_s": run.encode_timeout(extractor.num_frames),
                                 "decode_wait_s": run.decode_wait()}

    def _start_actors(self, config: JobConfig) -> Dims:
        """Start the model actors and wait until their models are built (a bad weights file fails here)."""
        import ray

        run = config.run
        gpus = ray.cluster_resources().get("GPU", 0.0)
        if run.actor_gpus * run.model_actors > gpus:
            raise ConfigError(
                f"run.actor_gpus={run.actor_gpus} x run.model_actors={run.model_actors} needs more GPUs than the Ray "
                f"cluster has ({gpus:g}); on CPU use --set run.actor_gpus=0 --set run.device=cpu"
            )
        threads = model_threads(run)
        actor_cls = ray.remote(_ModelActor).options(
            num_cpus=run.actor_cpus, num_gpus=run.actor_gpus, max_restarts=-1, max_task_retries=0
        )
        self.actors = [actor_cls.remote(config.extractor, run.device, threads, self.job_id, i)
                       for i in range(run.model_actors)]
        from extractors.config import ExtractorConfig

        wait = max(300.0, 2 * run.encode_timeout(ExtractorConfig.from_dict(config.extractor).num_frames))
        try:
            return ray.get([a.dims.remote() for a in self.actors], timeout=wait)[0]
        except ray.exceptions.GetTimeoutError as e:
            raise ConfigError(f"the model actors did not build their models within {wait:g} s (a GPU that hangs? "
                              f"not enough CPUs/GPUs in the cluster for run.model_actors={run.model_actors}?)") from e
        except ray.exceptions.RayActorError as e:
            cause = str(e).strip().splitlines()[-1]  # the creation task's own exception, last in the message
            raise ConfigError(f"the model actors could not build the models: {cause}") from e

    @property
    def dims(self) -> Dims:
        return self._dims

    def actor_pids(self) -> list[int]:
        import ray

        return ray.get([a.pid.remote() for a in self.actors])

    def run(self, jobs: Iterable[ShardJob]) -> Iterator[Event]:
        import ray

        attempts = _Attempts(self.run_config.shard_retries, self.run_config.out)
        fresh = iter(jobs)  # built lazily by the driver: only the open shards' rows are in memory
        queue: list[ShardJob] = []  # shards to retry, taken before fresh ones
        live = self.live
        while True:
            while len(live) < self.run_config.concurrent_shards:
                job = queue.pop() if queue else next(fresh, None)
                if job is None:
                    break
                attempts.start(job.spec.index)
                live[self.shard_task.remote(job, self.decoder_ref, self.actors, self.executor_options)] = job
            if not live:
                return
            ready, _ = ray.wait(list(live), num_returns=1, timeout=1.0)
            for gen in ready:
                job = live[gen]
                try:
                    event = ray.get(next(gen))
                except StopIteration:
                    del live[gen]
                    continue
                except Exception as e:  # RayTaskError, WorkerCrashedError, RayActorError, ...
                    del live[gen]
                    event, again = attempts.failed(job.spec.index, e)
                    if again:
                        queue.append(job)
                if isinstance(event, ShardProgress):
                    attempts.seen(event)
                elif isinstance(event, ShardResult):
                    del live[gen]
                yield event

    def close(self) -> None:
        import ray

        for gen in self.live:  # a stopped job: its shards' writers must not go on in a cluster
            try:
                ray.cancel(gen, force=True)
            except Exception as e:  # noqa: BLE001 - best effort; the writer's partial shard is never committed
                log.warning("could not cancel a shard task: %s", e)
        self.live.clear()
        for actor in self.actors:
            ray.kill(actor)
        if self.started and ray.is_initialized():
            ray.shutdown()


def make_runner(config: JobConfig) -> LocalRunner | RayRunner:
    return LocalRunner(config) if config.run.runner == "local" else RayRunner(config)
