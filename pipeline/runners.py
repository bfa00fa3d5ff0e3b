"""Runners execute shard jobs and stream their events to the driver: in-process (no Ray; comparisons
and tiny jobs) or on Ray (CPU decode tasks, long-lived model actors, one writer task per shard).

Both retry a shard whose attempt raised, up to `shard_retries` times; a shard that still fails is
reported as ShardFailed and stays pending in the store (never half-written: the store only sees a
shard once its ledger is committed).
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from pipeline.config import ConfigError, JobConfig, RunConfig
from pipeline.shard import ShardJob, ShardProgress, ShardResult, process_shard
from pipeline.work import Decoded, DecodeStatus, Decoder, Encoded, ModelRunner, VideoTask
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


class _Attempts:
    """Per-shard attempt counting and progress bookkeeping shared by both runners."""

    def __init__(self, retries: int) -> None:
        self.retries = retries
        self.attempt: dict[int, int] = {}
        self.progress: dict[int, list[int]] = {}

    def start(self, index: int) -> None:
        self.attempt[index] = self.attempt.get(index, 0) + 1
        self.progress[index] = [0, 0]

    def seen(self, event: ShardProgress) -> None:
        self.progress[event.index][0] += event.ok
        self.progress[event.index][1] += event.failed

    def failed(self, index: int, error: BaseException) -> tuple[Event, bool]:
        """The event for a failed attempt, and whether to try again."""
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


class LocalExecutor:
    """Runs each stage in this process, when asked: handles are the results themselves."""

    def __init__(self, decoder: Decoder, model: ModelRunner) -> None:
        self.decoder = decoder
        self.model = model

    def submit_decode(self, task: VideoTask) -> tuple[DecodeStatus, Decoded | None]:
        return self.decoder(task)

    def decode_status(self, handle: tuple[DecodeStatus, Decoded | None]) -> DecodeStatus:
        return handle[0]

    def submit_encode(self, handles: list[tuple[DecodeStatus, Decoded | None]], batch_index: int) -> Encoded:
        return self.model([decoded for _, decoded in handles])

    def encoded(self, handle: Encoded) -> Encoded:
        return handle


class LocalRunner:
    """A plain in-process loop over shards: the reference the Ray runner is measured against."""

    def __init__(self, config: JobConfig) -> None:
        run = config.run
        try:
            self.model = ModelRunner(config.extractor, run.device, model_threads(run))
        except (OSError, ValueError) as e:  # a missing or unreadable weights file, a model the config cannot build
            raise ConfigError(f"could not build the models: {type(e).__name__}: {e}") from e
        need_boxes = self.model.config.regions.kind == "given"
        self.executor = LocalExecutor(Decoder(self.model.config.sampling, run.timeout_s, need_boxes), self.model)
        self.retries = run.shard_retries

    @property
    def dims(self) -> Dims:
        return self.model.dims

    def run(self, jobs: Iterable[ShardJob]) -> Iterator[Event]:
        attempts = _Attempts(self.retries)
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
        pass


# ---------------------------------------------------------------- Ray
def ray_init(address: str, num_cpus: int) -> bool:
    """Join `address` (or $RAY_ADDRESS), else start an embedded Ray bound to loopback. Returns True when
    this process started Ray (and must shut it down)."""
    import ray

    if ray.is_initialized():  # a caller (a test, a notebook) runs Ray already: use it, leave it running
        return False
    address = address or os.environ.get("RAY_ADDRESS", "")
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
    # Without the first variable Ray 2.60 binds every interface; the second turns token auth off,
    # which only a loopback-only embedded cluster may do.
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ["RAY_AUTH_MODE"] = "disabled"
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(
        address="local",
        num_cpus=num_cpus or os.cpu_count(),
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        log_to_driver=True,
    )
    return True


class _ModelActor:
    """A long-lived holder of the frame encoder + region source; batches of many videos come to it."""

    def __init__(self, extractor: dict, device: str, threads: int) -> None:
        import warnings

        # Frames arrive as read-only views of Ray's object store; the models only read them.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        self.runner = ModelRunner(extractor, device, threads)

    def dims(self) -> Dims:
        return self.runner.dims

    def pid(self) -> int:
        return os.getpid()

    def encode(self, *decoded: Decoded) -> Encoded:
        # Ray resolves top-level ObjectRef arguments: the frames come straight from the decode workers.
        return self.runner(list(decoded))


def _decode(decoder: Decoder, task: VideoTask) -> tuple[DecodeStatus, Decoded | None]:
    return decoder(task)


def _shard_task(job: ShardJob, decoder_ref: Any, actors: list[Any], decode_options: dict) -> Iterator[Any]:
    executor = RayExecutor(decoder_ref, actors, decode_options)
    yield from process_shard(job, executor)


class RayExecutor:
    """Decodes as Ray tasks (two returns: the small status, and the frames that go on to an actor);
    encodes on the model actors, round-robin by batch."""

    def __init__(self, decoder_ref: Any, actors: list[Any], decode_options: dict) -> None:
        import ray

        self.decoder_ref = decoder_ref
        self.actors = actors
        self.decode = ray.remote(_decode).options(**decode_options, num_returns=2, max_retries=0)

    def submit_decode(self, task: VideoTask) -> tuple[Any, Any]:
        return tuple(self.decode.remote(self.decoder_ref, task))

    def decode_status(self, handle: tuple[Any, Any]) -> DecodeStatus:
        import ray

        return ray.get(handle[0])

    def submit_encode(self, handles: list[tuple[Any, Any]], batch_index: int) -> Any:
        actor = self.actors[batch_index % len(self.actors)]
        return actor.encode.remote(*(frames for _, frames in handles))

    def encoded(self, handle: Any) -> Encoded:
        import ray

        return ray.get(handle)


class RayRunner:
    """Shards as streaming Ray tasks (num_cpus=0: a writer mostly waits), at most `concurrent_shards`
    at once; decode tasks and model actors do the compute."""

    def __init__(self, config: JobConfig) -> None:
        from extractors.config import ExtractorConfig

        self.run_config = run = config.run
        self.actors: list[Any] = []
        self.started = ray_init(run.ray_address, run.num_cpus)
        try:
            self._dims = self._start_actors(config)
        except BaseException:
            self.close()
            raise
        extractor = ExtractorConfig.from_dict(config.extractor)
        decoder = Decoder(extractor.sampling, run.timeout_s, extractor.regions.kind == "given")
        import ray

        self.decoder_ref = ray.put(decoder)
        self.shard_task = ray.remote(_shard_task).options(num_cpus=0, max_retries=0)

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
        self.actors = [actor_cls.remote(config.extractor, run.device, threads) for _ in range(run.model_actors)]
        try:
            return ray.get([a.dims.remote() for a in self.actors])[0]
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

        attempts = _Attempts(self.run_config.shard_retries)
        fresh = iter(jobs)  # built lazily by the driver: only the open shards' rows are in memory
        queue: list[ShardJob] = []  # shards to retry, taken before fresh ones
        live: dict[Any, ShardJob] = {}
        decode_options = {"num_cpus": self.run_config.decode_cpus}
        while True:
            while len(live) < self.run_config.concurrent_shards:
                job = queue.pop() if queue else next(fresh, None)
                if job is None:
                    break
                attempts.start(job.spec.index)
                live[self.shard_task.remote(job, self.decoder_ref, self.actors, decode_options)] = job
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

        for actor in self.actors:
            ray.kill(actor)
        if self.started and ray.is_initialized():
            ray.shutdown()


def make_runner(config: JobConfig) -> LocalRunner | RayRunner:
    return LocalRunner(config) if config.run.runner == "local" else RayRunner(config)
