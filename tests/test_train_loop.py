"""The training loop on a real (zarr) store of synthetic features: exact resume, the CLI, bad input."""
import json
import shutil
from pathlib import Path

import pytest
import torch

from _train_helpers import make_synthetic_store
from stores.schema import Dims
from train.cli import eval_main, train_main
from train.config import ConfigError, TrainConfig, apply_overrides, load_config
from train.data import eval_shard
from train.trainer import Trainer


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return make_synthetic_store(tmp_path_factory.mktemp("train_store") / "features", n_train=40, n_test=8)


def _cfg(*extra):
    return apply_overrides(TrainConfig(), [
        "optim.steps=6", "optim.batch_size=8", "optim.warmup_steps=2", "data.eval_split=",
        "loss.align_weight=1.0", "loss.clip_word_weight=0.5", "loss.loc_weight=0.5",
        "run.ckpt_every=0", "run.log_every=1", *extra])


def _params(trainer):
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


def test_resume_equals_uninterrupted_run(store, tmp_path):
    """With a feature queue (12 entries, batches of 8: it wraps): the checkpoint restores it exactly."""
    full = Trainer(_cfg("loss.queue_size=12"), str(store), tmp_path / "full")
    full.fit()
    part_cfg = _cfg("optim.steps=6", "loss.queue_size=12")
    first = Trainer(part_cfg, str(store), tmp_path / "part")
    for _ in range(3):  # stop after 3 of 6 steps, as a crash or Ctrl-C would
        first.train_step()
    first.checkpoint()
    second = Trainer(part_cfg, str(store), tmp_path / "part", resume=True)
    assert second.step == 3
    second.fit()
    assert full.queue.filled == 12 and torch.equal(full.queue.video, second.queue.video)
    assert torch.equal(full.queue.text, second.queue.text) and full.queue.ptr == second.queue.ptr
    a, b = _params(full), _params(second)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    losses = lambda run: [json.loads(ln)["loss"] for ln in (run / "metrics.jsonl").read_text().splitlines()
                          if '"train"' in ln]
    assert losses(tmp_path / "full")[3:] == losses(tmp_path / "part")[-3:]


def test_cli_train_then_eval(store, tmp_path):
    run = tmp_path / "run"
    rc = train_main(["--features", str(store), "--out", str(run), "--steps", "4", "--batch-size", "8",
                     "--eval-split", "test", "--eval-every", "2", "--align-weight", "1", "--loc-weight", "1"])
    assert rc == 0
    for name in ("config.json", "checkpoint.pt", "metrics.jsonl", "curves.png"):
        assert (run / name).is_file(), name
    assert json.loads((run / "config.json").read_text())["loss"]["align_weight"] == 1.0
    rc = eval_main(["--checkpoint", str(run), "--features", str(store), "--split", "test"])
    assert rc == 0
    m = json.loads((run / "eval_test.json").read_text())
    assert m["videos"] == 8 and m["binding_pairs"] == 8 and m["moment_queries"] == 8
    assert 0 <= m["t2v_R@1"] <= 100 and m["checkpoint_step"] == 4
    # an existing run is never overwritten silently
    assert train_main(["--features", str(store), "--out", str(run), "--steps", "4"]) == 2


def test_store_not_matching_checkpoint_is_rejected(store, tmp_path, capsys):
    run = tmp_path / "run"
    assert train_main(["--features", str(store), "--out", str(run), "--steps", "2", "--batch-size", "8",
                       "--eval-split", ""]) == 0
    other = make_synthetic_store(tmp_path / "other", n_train=8, n_test=4, dims=Dims(T=4, K=3, Df=12, Dr=24))
    assert eval_main(["--checkpoint", str(run), "--features", str(other), "--split", "test"]) == 2
    err = capsys.readouterr().err
    assert "Df checkpoint=16 store=12" in err and "does not match the checkpoint" in err
    # a store of another format version: the reader refuses it with the version it found
    bumped = tmp_path / "bumped"
    shutil.copytree(store, bumped)
    meta = json.loads((bumped / "store.json").read_text())
    meta["format_version"] = 99
    (bumped / "store.json").write_text(json.dumps(meta))
    assert eval_main(["--checkpoint", str(run), "--features", str(bumped), "--split", "test"]) == 2
    assert "format version 99" in capsys.readouterr().err
    # resuming the run on a store of other dims: the same clear error
    args = ["--features", str(store), "--out", str(run), "--steps", "2", "--batch-size", "8", "--eval-split", ""]
    assert train_main(args[2:] + ["--features", str(other), "--resume"]) == 2
    assert "Df checkpoint=16 store=12" in capsys.readouterr().err
    # a checkpoint whose parameters differ from this code's model (code changed between save and resume,
    # config unchanged): a parameter renamed, another reshaped; named before torch's optimizer error
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    ckpt["model"]["old_logit_scale"] = ckpt["model"].pop("logit_scale")
    name = next(k for k, v in ckpt["model"].items() if v.ndim == 2)
    ckpt["model"][name] = ckpt["model"][name][:, :-1]
    torch.save(ckpt, run / "checkpoint.pt")
    assert train_main(args + ["--resume"]) == 2
    err = capsys.readouterr().err
    assert f"cannot resume {str(run / 'checkpoint.pt')!r}" in err and "Start a new run (another --out)" in err
    assert "only in the checkpoint (e.g. ['old_logit_scale'])" in err and "only in this code's model (e.g. ['logit_scale'])" in err
    assert f"1 of another shape (['{name} " in err


def test_empty_split_is_a_clear_error(store, tmp_path, capsys):
    rc = train_main(["--features", str(store), "--out", str(tmp_path / "r"), "--split", "valid", "--eval-split", "",
                     "--batch-size", "8"])
    assert rc == 2  # the streamed split has no video: found by the DataLoader workers, named in the error
    err = capsys.readouterr().err
    assert "usable 'valid' videos" in err and "split values seen" in err and "'test'" in err
    rc = train_main(["--features", str(store), "--out", str(tmp_path / "r2"), "--eval-split", "valid"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "split 'valid'" in err and "has no stored videos" in err and "'test'" in err


def test_long_captions_error_or_documented_truncation(store, tmp_path, capsys):
    args = ["--features", str(store), "--steps", "1", "--batch-size", "8", "--eval-split", "", "--set", "text.max_tokens=6"]
    assert train_main(args + ["--out", str(tmp_path / "a"), "--set", "text.long_captions=error"]) == 2
    assert "over text.max_tokens=6" in capsys.readouterr().err
    assert train_main(args + ["--out", str(tmp_path / "b")]) == 0  # default: truncate (logged)
    with pytest.raises(ConfigError, match="text.max_tokens"):
        apply_overrides(TrainConfig(), ["text.max_tokens=600"]).validate()


def test_config_overrides_are_strict(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'lrr'"):
        apply_overrides(TrainConfig(), ["optim.lrr=1"])
    with pytest.raises(ConfigError, match="optim.steps must be int"):
        apply_overrides(TrainConfig(), ["optim.steps=1.5"])
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['loss.global'\]"):
        TrainConfig.from_dict({"loss": {"global": 1.0}})
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 0.01\n")
    assert load_config(path, ["optim.steps=7"]).optim.lr == 0.01


def test_eval_shards_keep_every_item():
    shards = [eval_shard(10, r, 3).tolist() for r in range(3)]
    assert sorted(sum(shards, [])) == list(range(10))


def _as_transformers_bert(state: dict, prefix: str = "text.minilm.") -> dict:
    """A live-MiniLM model state dict under the names transformers' BertModel gave it (the text tower
    before train.text.MiniLM): what such a run's checkpoint holds (the inverse of text._hf_keys_hook)."""
    from train.text import _HF_EMBEDDINGS, _HF_LAYER

    out = {}
    for k, v in state.items():
        rest = k[len(prefix):]
        if not k.startswith(prefix):
            out[k] = v
        elif rest.startswith("encoder.layers."):
            i, sub = rest[len("encoder.layers."):].split(".", 1)
            base = f"{prefix}encoder.layer.{i}."
            if sub.startswith("self_attn.in_proj_"):
                for qkv, part in zip(("query", "key", "value"), v.chunk(3)):
                    out[f"{base}attention.self.{qkv}.{sub.rsplit('_', 1)[1]}"] = part
            else:
                old = next(o for o, n in _HF_LAYER.items() if sub.startswith(n))
                out[base + old + sub[len(_HF_LAYER[old]):]] = v
        else:
            old = next(o for o, n in _HF_EMBEDDINGS.items() if rest.startswith(n))
            out[prefix + old + rest[len(_HF_EMBEDDINGS[old]):]] = v
    return out


@pytest.mark.slow  # a live-MiniLM run, its 270 MB checkpoint written twice, and an evaluation (~20 CPU s)
def test_resume_of_a_live_minilm_checkpoint_from_transformers_is_a_clear_error(store, tmp_path, capsys):
    """A live-MiniLM run saved while the text tower was transformers' BertModel (same config, other
    parameter names and count): resume names the checkpoint and what to do, before torch's optimizer
    error; evaluation still reads its weights."""
    run = tmp_path / "run"
    args = ["--features", str(store), "--out", str(run), "--steps", "1", "--batch-size", "8", "--eval-split", "",
            "--text-trainable"]
    assert train_main(args) == 0
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    ckpt["model"] = _as_transformers_bert(ckpt["model"])
    layers = sum(k.endswith("attention.self.query.weight") for k in ckpt["model"])
    text_group = ckpt["optimizer"]["param_groups"][-1]  # q, k, v were 6 tensors per layer, not 2
    text_group["params"] = text_group["params"] + [10_000 + i for i in range(4 * layers)]
    torch.save(ckpt, run / "checkpoint.pt")
    assert train_main(args + ["--resume"]) == 2
    err = capsys.readouterr().err
    assert f"cannot resume {str(run / 'checkpoint.pt')!r}" in err and "only in the checkpoint" in err
    assert "'text.minilm.embeddings." in err and "Start a new run (another --out)" in err
    assert eval_main(["--checkpoint", str(run), "--features", str(store), "--split", "test"]) == 0
    # the unchanged check passes a checkpoint of this code: its resume is tested bitwise above

