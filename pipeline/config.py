"""Extraction job configuration: dataclasses with commented defaults, strict overrides.

A job config has three sections: `input` (what to read), `run` (where to write, how to execute) and
`extractor` (what to compute: validated by extractors.config.ExtractorConfig.from_dict). It comes from
a YAML file (configs/datasets/NAME.yaml or --config FILE), then command-line flags, then
`--set section.key=value` overrides; an unknown key or a value of the wrong type is a ConfigError.
The resolved config is saved in the output folder of every run.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vlpconfig import ConfigError, check_type, from_dict

from pipeline.manifest import DEFAULT_WEBVID_TEMPLATE, FORMATS

STORES = ("zarr", "hdf5")
RUNNERS = ("ray", "local")


@dataclass
class InputConfig:
    manifest: str = ""  # CSV / JSONL / WebVid CSV file, or a video2dataset output folder
    video_root: str = ""  # relative video paths resolve here ("" = the manifest's folder)
    format: str = "auto"  # auto | generic | webvid | video2dataset
    path_template: str = DEFAULT_WEBVID_TEMPLATE  # WebVid only: where a downloaded video sits

    def validate(self) -> None:
        if self.format not in FORMATS:
            raise ConfigError(f"input.format must be one of {FORMATS}, got {self.format!r}")


@dataclass
class RunConfig:
    out: str = ""  # output folder (the store, the resolved config, one stats JSON per run)
    store: str = "zarr"  # zarr | hdf5
    compression: str | None = None  # None | "zstd" (passed to the store)
    shard_size: int = 1000  # videos per shard = unit of work, retry and commit
    runner: str = "ray"  # ray (embedded on loopback, or a cluster) | local (in-process, no Ray)
    ray_address: str = ""  # join this Ray cluster ("" = $RAY_ADDRESS, else an embedded Ray on loopback)
    num_cpus: int = 0  # CPUs of the embedded Ray (0 = all cores of this machine)
    model_actors: int = 1  # long-lived actors holding the frame encoder + region source
    actor_gpus: float = 0.0  # GPUs per model actor (1 on GPU nodes)
    actor_cpus: float = 1.0  # CPUs reserved per model actor
    actor_threads: int = 0  # torch threads per model holder, both runners (0 = actor_cpus, at least 1);
    # on CPU the thread count changes a forward pass's bits: keep it fixed across reruns of one store
    decode_cpus: float = 1.0  # CPUs reserved per decode task
    device: str = "cpu"  # torch device of the models ("cuda" with actor_gpus=1)
    batch_videos: int = 8  # videos whose frames go through one forward pass (fixed per shard: bitwise resume)
    max_inflight_videos: int = 32  # decoded-or-decoding videos per shard at once (backpressure)
    concurrent_shards: int = 2  # shards open at once (each has one writer)
    timeout_s: float = 120.0  # per-video decode timeout; the decode is killed, the video recorded failed
    encode_timeout_s: float = 0.0  # longest forward pass of one batch before its model actor is killed and
    # replaced (0 = auto: 60 s + 2 s per frame of a batch, batch_videos x T)
    decode_wait_s: float = 0.0  # longest wait for a decode task, queue included, before it is cancelled and
    # resubmitted once (0 = auto: 2 x timeout_s + 60 s)
    io_retries: int = 3  # retries of a video read that hit a transient I/O error (EIO, ESTALE, ...)
    io_backoff_s: float = 1.0  # first retry's delay; doubles each retry
    shard_retries: int = 2  # retries of a shard whose worker died
    max_failure_rate: float = 0.05  # stop with exit 1 once failed/done exceeds this (1.0 = never)
    failure_check_after: int = 200  # videos this run must finish before the failure rate is checked as it goes
    lock_lease_s: float = 60.0  # --out lock lease: renewed every lease/3; a lock not renewed for this long is stale
    retry_failed: bool = False  # re-attempt only the failed videos of committed shards
    progress: bool = True  # tqdm bar on stderr

    def validate(self) -> None:
        if not self.out:
            raise ConfigError("run.out is empty: pass --out DIR (or set run.out in the config)")
        if self.store not in STORES:
            raise ConfigError(f"run.store must be one of {STORES}, got {self.store!r}")
        if self.runner not in RUNNERS:
            raise ConfigError(f"run.runner must be one of {RUNNERS}, got {self.runner!r}")
        for name in ("shard_size", "model_actors", "batch_videos", "max_inflight_videos", "concurrent_shards"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"run.{name} must be > 0, got {getattr(self, name)}")
        if self.max_inflight_videos < self.batch_videos:
            raise ConfigError(
                f"run.max_inflight_videos ({self.max_inflight_videos}) must be >= run.batch_videos ({self.batch_videos})"
            )
        if self.timeout_s <= 0 or self.shard_retries < 0:
            raise ConfigError(f"run.timeout_s must be > 0 and run.shard_retries >= 0, got {self.timeout_s}, {self.shard_retries}")
        for name in ("encode_timeout_s", "decode_wait_s", "io_retries", "io_backoff_s", "failure_check_after"):
            if getattr(self, name) < 0:
                raise ConfigError(f"run.{name} must be >= 0, got {getattr(self, name)}")
        if self.lock_lease_s < 3:
            raise ConfigError(f"run.lock_lease_s must be >= 3 (seconds), got {self.lock_lease_s}")
        if not 0.0 <= self.max_failure_rate <= 1.0:
            raise ConfigError(f"run.max_failure_rate must be in [0, 1], got {self.max_failure_rate}")

    def encode_timeout(self, frames_per_video: int) -> float:
        """Seconds one batch's forward pass may take: scales with the batch unless set."""
        return self.encode_timeout_s or 60.0 + 2.0 * self.batch_videos * frames_per_video

    def decode_wait(self) -> float:
        return self.decode_wait_s or 2 * self.timeout_s + 60.0


@dataclass
class JobConfig:
    input: InputConfig = field(default_factory=InputConfig)
    run: RunConfig = field(default_factory=RunConfig)
    extractor: dict[str, Any] = field(default_factory=dict)  # extractors.config.ExtractorConfig.from_dict input

    def validate(self) -> None:
        self.input.validate()
        self.run.validate()
        if not self.input.manifest:
            raise ConfigError("input.manifest is empty: pass --manifest FILE (or --dataset NAME)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def job_config_from_dict(data: dict[str, Any]) -> JobConfig:
    """Strict: unknown sections/keys or wrong types raise ConfigError."""
    data = dict(data or {})
    unknown = sorted(set(data) - {"input", "run", "extractor", "demo"})
    if unknown:
        raise ConfigError(f"unknown config section(s) {unknown}; known: input, run, extractor (and demo in dataset files)")
    data.pop("demo", None)
    return JobConfig(
        input=from_dict(InputConfig, data.get("input", {}), "input."),
        run=from_dict(RunConfig, data.get("run", {}), "run."),
        extractor=check_type("extractor", data.get("extractor", {}) or {}, dict[str, Any]),
    )


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping, got {type(data).__name__}")
    return data


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` on top of `base`, recursing into mappings (a later config file refines an earlier one)."""
    merged = dict(base)
    for key, value in over.items():
        merged[key] = deep_merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """`section.key[.sub]=value` (value parsed as YAML) set in the nested dict `data`, in place.
    Keys are checked when the dict is turned into a JobConfig / ExtractorConfig."""
    key, sep, raw = assignment.partition("=")
    parts = key.strip().split(".")
    if not sep or len(parts) < 2 or not all(parts):
        raise ConfigError(f"--set expects section.key=value (e.g. run.batch_videos=4), got {assignment!r}")
    if parts[0] not in ("input", "run", "extractor"):
        raise ConfigError(f"--set {assignment!r}: section must be input, run or extractor, got {parts[0]!r}")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {assignment!r}: {part!r} is a value, not a section")
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {assignment!r}: value is not valid YAML ({e})") from e


def save_config(config: JobConfig, extractor_config: Any, path: Path) -> None:
    """The resolved config (extractor section fully expanded with defaults), written atomically."""
    resolved = config.to_dict()
    resolved["extractor"] = dataclasses.asdict(extractor_config)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(yaml.safe_dump(resolved, sort_keys=False))
    tmp.replace(path)
