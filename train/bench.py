"""The cache side of `make bench-train` (benchmarks/bench_train.py runs it beside the pixel baseline):
synthetic stores through the public writer, training samples/s from a store, loader samples/s against
a training step's consumption, and the peak RSS of a training run as the store grows.

Imports only stores/ and train/ (the pixel baseline, which needs extractors/, lives in benchmarks/).
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from stores import create_store
from stores.schema import ARRAYS, Dims

WORDS = ("red green blue yellow circle square triangle diamond moves left right up down quickly slowly "
         "enters leaves while then a the small large").split()


def synthetic_store(out: Path, n: int, dims: Dims, shard_size: int = 1000, seed: int = 0) -> Path:
    """n videos of random features and random captions (split=train), written shard by shard through
    the public writer (one shard's arrays in memory at a time)."""
    rng = np.random.default_rng(seed)
    w = create_store(out, "zarr", dims=dims, n_videos=n, shard_size=shard_size, provenance={"bench": "train"},
                     video_ids=(f"v{i:08d}" for i in range(n)))
    T, K = dims.T, dims.K
    for shard in range((n + shard_size - 1) // shard_size):
        sw = w.shard_writer(shard)
        rows = range(shard * shard_size, min(n, (shard + 1) * shard_size))
        m = len(rows)  # one shard's arrays drawn at once (a per-row draw costs as much as the write)
        a = {name: np.zeros((m, *spec.shape(dims)), spec.dtype) for name, spec in ARRAYS.items()}
        a["frame_features"][:] = rng.standard_normal((m, T, dims.Df))
        a["region_features"][:] = rng.standard_normal((m, T, K, dims.Dr))
        xy = rng.uniform(0, 0.7, (m, T, K, 2))
        a["region_boxes"][:] = np.concatenate([xy, xy + 0.3], -1)
        a["region_scores"][:] = 1.0
        a["region_classes"][:] = np.arange(K)
        a["region_counts"][:] = K
        a["frame_times"][:] = np.arange(T) * 0.5
        words, lengths = rng.choice(WORDS, (m, 11)), rng.integers(4, 12, m)
        for i, row in enumerate(rows):
            caption = " ".join(words[i, :lengths[i]])
            sw.put(row, f"v{row:08d}", caption, {name: x[i] for name, x in a.items()}, meta={"split": "train"})
        sw.commit()
    return Path(out)


def store_bytes(store: Path) -> int:
    return sum(p.stat().st_size for p in Path(store).rglob("*") if p.is_file())


def bench_config(steps: int, batch_size: int, workers: int, extra: list[str] = ()):
    from train.config import TrainConfig, apply_overrides

    return apply_overrides(TrainConfig(), [f"optim.steps={steps}", f"optim.batch_size={batch_size}",
                                           "data.eval_split=", "run.ckpt_every=0", "run.log_every=1000",
                                           f"data.workers={workers}", *extra]).validate()


def train_rate(store: Path, out: Path, steps: int, batch_size: int, workers: int = 2) -> dict[str, float]:
    """Training samples/s of the default trainer model from the store (the first step, which starts the
    loader and fills the text cache, is not timed)."""
    from train.trainer import Trainer

    trainer = Trainer(bench_config(steps + 1, batch_size, workers), str(store), out)
    trainer.train_step()
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    wall = time.perf_counter() - start
    trainer._batches = None
    return {"samples_per_s": steps * batch_size / wall, "step_s": wall / steps}


def drop_page_cache(store: Path) -> None:
    """Evict the store's files from the page cache (posix_fadvise DONTNEED, per file: no root or
    /proc/sys/vm/drop_caches needed), so the next reads come from the disk. Pages another process has
    mapped stay."""
    import os

    for p in Path(store).rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def loader_rate(store: Path, batches: int, batch_size: int, workers: int = 2, cold: bool = False) -> float:
    """Samples/s the streaming DataLoader delivers alone (tokens built, captions tokenised); cold: from
    a page cache without the store's files (`drop_page_cache`), else as the cache happens to be."""
    from torch.utils.data import DataLoader

    from train.stream import FeatureStream, StreamSpec

    if cold:
        drop_page_cache(store)
    stream = FeatureStream(StreamSpec(str(store), batch_size=batch_size, workers=workers))
    it = iter(DataLoader(stream, batch_size=None, num_workers=workers, prefetch_factor=4 if workers else None))
    next(it)
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * batch_size / (time.perf_counter() - start)


def peak_rss_of_training(store: Path, out: Path, steps: int, batch_size: int, workers: int = 2) -> dict[str, float]:
    """Peak memory (MB) of a training run in a fresh process: the trainer's peak RSS (VmHWM) and the peak
    PSS of the trainer plus its loader workers (sampled every 50 ms) and the peaks of its parts
    (`RssSampler`: anonymous, file-backed, the store's mapped files); and the trainer's RSS after
    `import torch`, after importing the trainer, and once the Trainer is built (its AdamW imports
    torch._dynamo: optimizer.step does, unconditionally). getrusage is not used: its maximum survives exec, so a
    child of a big benchmark process would report the parent's size."""
    code = ("import json, sys; from train.bench import bench_config, RssSampler, rss_mb; import torch; r = [rss_mb()]; "
            f"from train.trainer import Trainer; r.append(rss_mb()); s = RssSampler({str(store)!r}); "
            f"t = Trainer(bench_config({steps}, {batch_size}, {workers}), {str(store)!r}, {str(out)!r}); "
            "r.append(rss_mb()); t.fit(); "
            "print(json.dumps({**s.stop(), 'torch_mb': r[0], 'imports_mb': r[1], 'built_mb': r[2], "
            "'dynamo': 'torch._dynamo' in sys.modules}))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"training run on {store} failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def rss_mb() -> float:
    """This process's resident set now (MB)."""
    import os

    return _status_kb(os.getpid(), "VmRSS") / 1024


def _status_kb(pid: int, key: str, file: str = "status") -> int:
    try:
        for line in Path(f"/proc/{pid}/{file}").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:  # the process ended between listing and reading
        pass
    return 0


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            out += [int(c) for c in task.read_text().split()]
        except OSError:
            pass
    return out


class RssSampler:
    """Samples the proportional set size (PSS: pages shared after fork counted once) of this process and
    its descendants (Linux /proc) in a thread until stop(): the peak of the total, and the peaks of its
    parts. Anonymous pages (heap, tensors) are shared only within this process tree, so their PSS sum is
    exact. File-backed pages are page cache: the store's files (`store`, mapped by the loader workers;
    read from /proc/PID/smaps every `store_every` samples) and the rest (libraries, model weights), whose
    PSS also shrinks as other processes on the machine map the same files."""

    def __init__(self, store: str | Path | None = None, every_s: float = 0.05, store_every: int = 10):
        import os
        import threading

        self.pid, self.every_s, self.store_every = os.getpid(), every_s, store_every
        self.store = str(Path(store).resolve()) + "/" if store is not None else None
        self.peak_kb = {"tree": 0, "anon": 0, "file": 0, "store": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        n = 0
        while not self._stop.wait(self.every_s):
            pids, tree = [self.pid], []
            while pids:
                tree.append(pids.pop())
                pids += _children(tree[-1])
            kb = {"tree": 0, "anon": 0, "file": 0}
            for pid in tree:
                for key, field in (("tree", "Pss"), ("anon", "Pss_Anon"), ("file", "Pss_File")):
                    kb[key] += _status_kb(pid, field, "smaps_rollup")
            if self.store is not None and n % self.store_every == 0:
                kb["store"] = sum(_mapped_pss_kb(pid, self.store) for pid in tree)
            for key, v in kb.items():
                self.peak_kb[key] = max(self.peak_kb[key], v)
            n += 1

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        p = {k: v / 1024 for k, v in self.peak_kb.items()}
        return {"trainer_mb": _status_kb(self.pid, "VmHWM") / 1024, "with_workers_mb": p["tree"],
                "anon_pss_mb": p["anon"], "file_pss_mb": p["file"], "store_pss_mb": p["store"]}


def _mapped_pss_kb(pid: int, prefix: str) -> int:
    """PSS (kB) of a process's mappings of files under prefix (/proc/PID/smaps)."""
    total, inside = 0, False
    try:
        for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
            head = line.split(maxsplit=5)
            if head and "-" in head[0] and not head[0].endswith(":"):  # a mapping's first line
                inside = len(head) == 6 and head[5].startswith(prefix)
            elif inside and head[0] == "Pss:":
                total += int(head[1])
    except OSError:  # the process ended
        pass
    return total
