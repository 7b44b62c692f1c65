"""Tests of the language-modelling data module (data/lm.py, data/corpus.py, data/tokenizer.py).

Real components throughout: HF `datasets` on local files, the `tokenizers` GPT-2 BPE checked against
`transformers`, a real Lightning Trainer on CPU for resume, real subprocesses for the offline failure.
"""

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from conftest import REPO, SHARED_DATA
from hydra import compose, initialize_config_dir
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from data import corpus
from data.lm import LMDataModule

SEQ, BATCH, EPOCH_BATCHES = 16, 4, 9  # the tiny corpus has exactly 9 micro-batches of 4 windows per epoch


def _build_log(caplog) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "data.lm" and "building token cache" in r.getMessage()
    ]


@pytest.fixture(scope="module")
def tiny_text(tmp_path_factory) -> Path:
    """A local corpus of real text (Python source, ASCII) sized so that train has exactly
    SEQ * BATCH * EPOCH_BATCHES + 1 windows' worth of tokens: train.txt is one document of
    L bytes (+1 EOS), val.txt another file."""
    d = tmp_path_factory.mktemp("tiny_text")
    src = "".join(ch for ch in Path(textwrap.__file__).read_text() if ord(ch) < 128)
    n = SEQ * BATCH * EPOCH_BATCHES + 5  # tokens = n + 1 EOS -> (n + 1 - 1) // SEQ = 36 windows
    (d / "train.txt").write_text(src[:n])
    (d / "val.txt").write_text(src[n : n + 20 * SEQ])
    return d


def tiny_dm(tiny_text: Path, cache_dir: Path, **kw) -> LMDataModule:
    args = dict(
        source="local",
        path="train.txt",
        val_path="val.txt",
        data_root=str(tiny_text),
        tokenizer="bytes",
        seq_len=SEQ,
        batch_size=BATCH,
        num_workers=0,
        seed=7,
        cache_dir=str(cache_dir),
    )
    return LMDataModule(**{**args, **kw})


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory, tiny_text) -> Path:
    cache = tmp_path_factory.mktemp("tiny_cache")
    dm = tiny_dm(tiny_text, cache)
    dm.prepare_data()
    dm.setup()
    assert len(dm.train_set) == BATCH * EPOCH_BATCHES
    return cache


# ----------------------------------------------------------------------------- resume with a real Trainer


class TinyLM(L.LightningModule):
    """Embedding + Linear next-byte model; records a hash of every training batch it sees."""

    def __init__(self, vocab: int = 257):
        super().__init__()
        self.emb = nn.Embedding(vocab, 8)
        self.head = nn.Linear(8, vocab)
        self.seen: list[str] = []

    def training_step(self, batch, batch_idx):
        x, y = batch["input_ids"], batch["labels"]
        self.seen.append(hashlib.sha1(x.numpy().tobytes() + y.numpy().tobytes()).hexdigest())
        logits = self.head(self.emb(x))
        return nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(dm, max_steps, accumulate, root, ckpt_every=None, ckpt_path=None, limit_train_batches=1.0) -> TinyLM:
    torch.manual_seed(0)
    model = TinyLM()
    callbacks = []
    if ckpt_every:
        callbacks.append(ModelCheckpoint(dirpath=root, every_n_train_steps=ckpt_every, save_top_k=-1))
    trainer = L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        accumulate_grad_batches=accumulate,
        limit_train_batches=limit_train_batches,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=bool(ckpt_every),
        callbacks=callbacks,
        default_root_dir=root,
    )
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    assert trainer.global_step == max_steps
    return model


@pytest.mark.parametrize(
    "accumulate, k, n, workers, limit",
    [
        (1, EPOCH_BATCHES + 3, 2 * EPOCH_BATCHES + 4, 0, 1.0),  # mid-epoch; the resumed run crosses an epoch
        (2, 7, 13, 0, 1.0),  # 5 steps/epoch (the 5th on a partial accumulation); resumes at epoch 1, batch 4
        (1, EPOCH_BATCHES, EPOCH_BATCHES + 5, 1, 1.0),  # checkpoint at an epoch end; a worker process
        (2, 4, 9, 1, 5),  # limit_train_batches=5: 3 steps/epoch; resumes at epoch 1, batch 2; a worker
    ],
)
def test_resume_sees_same_batches(tiny_text, tiny_cache, tmp_path, caplog, accumulate, k, n, workers, limit):
    caplog.set_level(logging.INFO, logger="data.lm")

    def run(max_steps, root, **kw):
        dm = tiny_dm(tiny_text, tiny_cache, num_workers=workers)
        return _fit(dm, max_steps, accumulate, tmp_path / root, limit_train_batches=limit, **kw)

    ref = run(n, "ref")
    first = run(k, "a", ckpt_every=k)
    (ckpt,) = (tmp_path / "a").glob(f"*step={k}.ckpt")
    resumed = run(n, "b", ckpt_path=ckpt)
    assert len(ref.seen) == len(first.seen) + len(resumed.seen)
    assert first.seen + resumed.seen == ref.seen
    # the loader was built after Lightning restored global_step from the checkpoint
    msgs = [r.getMessage() for r in caplog.records if "starts at" in r.getMessage()]
    assert len(msgs) == 1 and f"global_step {k} x accumulate_grad_batches {accumulate}" in msgs[0]
    assert not _build_log(caplog)  # every run reused the cache


def test_resume_state_in_checkpoint_and_order_change_warns(tiny_text, tiny_cache, tmp_path, caplog, recwarn):
    caplog.set_level(logging.INFO, logger="data.lm")
    _fit(tiny_dm(tiny_text, tiny_cache), 5, 1, tmp_path / "a", ckpt_every=5)
    (ckpt,) = (tmp_path / "a").glob("*step=5.ckpt")
    state = torch.load(ckpt, weights_only=False)["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert state[0]["seed"] == 7 and state[0]["batch_size"] == BATCH and state[0]["world_size"] == 1
    _fit(tiny_dm(tiny_text, tiny_cache, seed=8), 7, 1, tmp_path / "b", ckpt_path=ckpt)
    assert not any("not resumable" in str(w.message) for w in recwarn)  # Lightning sees a resumable loader
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("different data-order settings" in m and "'seed': (7, 8)" in m for m in warned)


# ----------------------------------------------------------------------------- windows, order, sharding


def _batches(loader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(b["input_ids"].clone(), b["labels"].clone()) for b in loader]


def test_windows_are_shifted_slices_of_the_token_file(tiny_text, tiny_cache):
    dm = tiny_dm(tiny_text, tiny_cache)
    dm.setup()
    tokens = np.fromfile(dm.token_dir() / "train.bin", dtype="<u2").astype(np.int64)
    # bytes tokenizer: the token file is the UTF-8 of train.txt followed by EOS (256)
    assert tokens.tolist() == list((tiny_text / "train.txt").read_bytes()) + [256]
    loader = dm.train_dataloader()
    order = loader.sampler.epoch_order(0)  # (N, B) window indices
    batches = _batches(loader)
    assert len(batches) == len(loader) == EPOCH_BATCHES
    for (x, y), idx in zip(batches, order, strict=True):
        assert x.shape == y.shape == (BATCH, SEQ) and x.dtype == y.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1])
        for row, i in enumerate(idx):
            assert x[row].tolist() == tokens[i * SEQ : i * SEQ + SEQ].tolist()
            assert y[row].tolist() == tokens[i * SEQ + 1 : i * SEQ + SEQ + 1].tolist()
    # one epoch visits every window once
    assert sorted(order.reshape(-1).tolist()) == list(range(BATCH * EPOCH_BATCHES))


def test_order_is_a_function_of_seed_and_epoch(tiny_text, tiny_cache):
    def epoch_batches(seed, epoch):
        dm = tiny_dm(tiny_text, tiny_cache, seed=seed)
        dm.setup()
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(epoch)
        return [x for x, _ in _batches(loader)]

    a, b = epoch_batches(1, 0), epoch_batches(1, 0)
    assert len(a) == len(b) and all(torch.equal(p, q) for p, q in zip(a, b, strict=True))
    for other in (epoch_batches(1, 1), epoch_batches(2, 0)):
        assert not all(torch.equal(p, q) for p, q in zip(a, other, strict=True))


def test_ddp_ranks_read_disjoint_shards_of_the_global_batch(tiny_text, tiny_cache):
    world, b = 2, 2
    single = tiny_dm(tiny_text, tiny_cache, batch_size=b * world, rank=0, world_size=1)
    single.setup()
    global_batches = [x for x, _ in _batches(single.train_dataloader())]
    per_rank, val_rows = [], []
    for rank in range(world):
        dm = tiny_dm(tiny_text, tiny_cache, batch_size=b, rank=rank, world_size=world)
        dm.setup()
        per_rank.append([x for x, _ in _batches(dm.train_dataloader())])
        val_rows.append([row.tolist() for x, _ in _batches(dm.val_dataloader()) for row in x])
    assert len(per_rank[0]) == len(per_rank[1]) == len(global_batches)
    for i, g in enumerate(global_batches):
        assert torch.equal(torch.cat([per_rank[0][i], per_rank[1][i]]), g)  # rank r holds rows [r*b, (r+1)*b)
    rows = [tuple(r.tolist()) for rank in per_rank for x in rank for r in x]
    assert len(set(rows)) == len(rows)  # no window is read twice in an epoch
    # validation: equal-size disjoint shards whose union is the single-process validation set
    single_val = [row.tolist() for x, _ in _batches(single.val_dataloader()) for row in x]
    assert len(val_rows[0]) == len(val_rows[1])
    assert sorted(val_rows[0] + val_rows[1]) == sorted(single_val[: 2 * len(val_rows[0])])


def test_validation_windows_in_order_and_capped(tiny_text, tiny_cache):
    dm = tiny_dm(tiny_text, tiny_cache, val_tokens=5 * SEQ + 3)
    dm.setup()
    tokens = np.fromfile(dm.token_dir() / "validation.bin", dtype="<u2").astype(np.int64)
    xs = torch.cat([x for x, _ in _batches(dm.val_dataloader())])
    assert xs.shape == (5, SEQ)
    assert xs.reshape(-1).tolist() == tokens[: 5 * SEQ].tolist()


# ----------------------------------------------------------------------------- the token cache

STDLIB_TEST_BYTES = 300_000


def stdlib_dm(cache_dir: Path, **kw) -> LMDataModule:
    args = dict(
        stdlib_max_bytes=STDLIB_TEST_BYTES, seq_len=64, batch_size=4, num_workers=0, cache_dir=str(cache_dir)
    )
    return LMDataModule(**{**args, **kw})


def test_cache_is_built_once_reused_and_rebuilt_when_corrupt(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="data.lm")
    dm = stdlib_dm(tmp_path)
    dm.prepare_data()
    assert len(_build_log(caplog)) == 1
    train = dm.token_dir() / "train.bin"
    good, mtime = train.read_bytes(), train.stat().st_mtime_ns

    dm = stdlib_dm(tmp_path)  # a new process would do the same: key, sidecar, size, sha256 all match
    dm.prepare_data()
    dm.setup()
    assert len(_build_log(caplog)) == 1 and train.stat().st_mtime_ns == mtime

    def corrupt_truncate():
        train.write_bytes(good[: len(good) // 2])

    def corrupt_flip():
        b = bytearray(good)
        b[len(b) // 3] ^= 0x01
        train.write_bytes(bytes(b))

    def corrupt_sidecar_gone():
        train.with_suffix(".json").unlink()

    def corrupt_sidecar_key():
        meta = json.loads(train.with_suffix(".json").read_text())
        meta["key"]["sample_by"] = "line"
        train.with_suffix(".json").write_text(json.dumps(meta))

    cases = [
        (corrupt_truncate, "size"),
        (corrupt_flip, "sha256 mismatch"),
        (corrupt_sidecar_gone, "no sidecar"),
        (corrupt_sidecar_key, "does not match"),
    ]
    for corrupt, reason in cases:
        corrupt()
        caplog.clear()
        dm = stdlib_dm(tmp_path)
        dm.prepare_data()
        dm.setup()
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and reason in warnings[0] and str(train) in warnings[0], (reason, warnings)
        assert len(_build_log(caplog)) == 1
        assert train.read_bytes() == good  # rebuilt, identical
    assert not list(dm.token_dir().glob(".*"))  # no temporary files left behind


def test_stdlib_corpus_hash_stable_and_token_count_exact(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="data.lm")
    metas, keys = [], []
    for sub in ("a", "b"):
        dm = stdlib_dm(tmp_path / sub)
        dm.prepare_data()
        dm.setup()
        metas.append(
            {s: json.loads((dm.token_dir() / f"{s}.json").read_text()) for s in ("train", "validation")}
        )
        keys.append(dm.cache_key()["source"])
    assert keys[0] == keys[1] and keys[0]["kind"] == "stdlib" and len(keys[0]["sha256"]) == 64
    for s in ("train", "validation"):
        assert (
            metas[0][s]["sha256"] == metas[1][s]["sha256"]
            and metas[0][s]["n_tokens"] == metas[1][s]["n_tokens"]
        )
    assert any(keys[0]["sha256"] in r.getMessage() for r in caplog.records)  # logged at start

    # the selection: sorted stdlib *.py without test folders, a prefix within the size cap
    files, total = corpus.stdlib_files(STDLIB_TEST_BYTES)
    names = [n for n, _ in files]
    assert names == sorted(names) and 0 < total <= STDLIB_TEST_BYTES and len(names) == keys[0]["n_files"]
    assert not any(set(n.split("/")) & {"test", "tests", "site-packages"} for n in names)
    # bytes tokenizer: every non-blank file is its UTF-8 bytes + 1 EOS; train + validation hold them all
    texts = [p.read_text(encoding="utf-8") for _, p in files]
    expected = sum(len(t.encode()) + 1 for t in texts if t.strip())
    assert metas[0]["train"]["n_tokens"] + metas[0]["validation"]["n_tokens"] == expected


# ----------------------------------------------------------------------------- tokenizers and local sources


def test_wikitext2_gpt2_token_count_matches_transformers(tmp_path):
    if not (SHARED_DATA / "text-core.tar.xz").is_file():
        pytest.skip(f"offline data not found: {SHARED_DATA / 'text-core.tar.xz'}")
    from transformers import GPT2TokenizerFast

    with initialize_config_dir(config_dir=str(REPO / "configs" / "data"), version_base="1.3"):
        cfg = compose("wikitext2", overrides=[f"data_root={SHARED_DATA}", f"cache_dir={tmp_path / 'cache'}"])
    dm = instantiate(cfg)
    dm.prepare_data()
    assert dm.vocab_size == 50257

    # independent reference: transformers' GPT-2 tokenizer loaded from the Hub file names
    with tarfile.open(SHARED_DATA / "text-core.tar.xz") as tf:
        tf.extractall(tmp_path / "ref", filter="data")
    ref_dir = tmp_path / "ref" / "hub_names"
    ref_dir.mkdir()
    shutil.copy(tmp_path / "ref" / "gpt2" / "encoder.json", ref_dir / "vocab.json")
    shutil.copy(tmp_path / "ref" / "gpt2" / "vocab.bpe", ref_dir / "merges.txt")
    ref = GPT2TokenizerFast.from_pretrained(str(ref_dir))
    lines = [s for s in (tmp_path / "ref" / "wikitext-2" / "valid.txt").read_text().splitlines() if s.strip()]
    expected = [i for s in lines for i in ref(s)["input_ids"] + [ref.eos_token_id]]
    tokens = np.fromfile(dm.token_dir() / "validation.bin", dtype="<u2")
    assert (
        len(tokens)
        == len(expected)
        == json.loads((dm.token_dir() / "validation.json").read_text())["n_tokens"]
    )
    assert tokens.tolist() == expected
    assert (
        dm.tokenizer.identity["sha256"]
        == hashlib.sha256(
            (ref_dir / "vocab.json").read_bytes() + b"\0" + (ref_dir / "merges.txt").read_bytes()
        ).hexdigest()
    )


def test_tarball_source_paragraphs_and_split_rule(tmp_path):
    from datasets import Dataset

    src = tmp_path / "src" / "docs"
    src.mkdir(parents=True)
    paras = [f"Paragraph {i}: " + "caf\u00e9 " * (i % 5 + 1) for i in range(12)]
    (src / "a.txt").write_text("\n\n".join(paras[:7]))
    (src / "sub").mkdir()
    (src / "sub" / "b.txt").write_text("\n\n".join(paras[7:]) + "\n\n   \n\n")  # a blank paragraph: dropped
    (src / "notes.md").write_text("not a .txt file")
    with tarfile.open(tmp_path / "corp.tar.gz", "w:gz") as tf:
        tf.add(src, arcname="docs")
    dm = LMDataModule(
        source="local",
        path="corp.tar.gz/docs",
        data_root=str(tmp_path),
        sample_by="paragraph",
        test_size=3,
        tokenizer="bytes",
        seq_len=8,
        batch_size=2,
        cache_dir=str(tmp_path / "cache"),
    )
    dm.prepare_data()
    # nanoGPT's split of the documents, done here directly with datasets
    split = Dataset.from_dict({"text": paras}).train_test_split(test_size=3, seed=2357, shuffle=True)
    for name, docs in (("train", split["train"]["text"]), ("validation", split["test"]["text"])):
        tokens = np.fromfile(dm.token_dir() / f"{name}.bin", dtype="<u2").tolist()
        assert tokens == [t for d in docs for t in list(d.encode()) + [256]]
    assert (tmp_path / "cache" / "extracted").is_dir()

    with pytest.raises(FileNotFoundError, match="has no member nope"):
        LMDataModule(
            source="local", path="corp.tar.gz/nope", data_root=str(tmp_path), cache_dir=str(tmp_path)
        ).prepare_data()


def test_missing_local_path_names_path_and_fix(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        LMDataModule(source="local", path="corpus/here.txt", data_root=str(tmp_path))
    msg = str(e.value)
    assert str(tmp_path / "corpus" / "here.txt") in msg and "Fix:" in msg and "FLASHREPRO_DATA" in msg
    assert "data=stdlib" in msg


def test_bad_arguments_fail_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="data.source"):
        LMDataModule(source="web")
    with pytest.raises(ValueError, match="data.sample_by"):
        LMDataModule(sample_by="sentence")
    with pytest.raises(ValueError, match="data.test_size"):
        LMDataModule(test_size=1.5)
    with pytest.raises(ValueError, match="data.seq_len"):
        LMDataModule(seq_len=0)
    with pytest.raises(ValueError, match="needs data.path"):
        LMDataModule(source="local")
    dm = LMDataModule(tokenizer="bytes", vocab_size=50257, cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="data.vocab_size=50257 but tokenizer='bytes' has 257"):
        dm.prepare_data()
    assert not (tmp_path / "tokens").exists()


OFFLINE_SCRIPT = """
from data.lm import LMDataModule
for kw in (dict(source="hub", hub_name="Skylion007/openwebtext", tokenizer="bytes"),
           dict(source="stdlib", tokenizer="gpt2")):
    try:
        LMDataModule(cache_dir={cache!r}, **kw).prepare_data()
        print("NO ERROR")
    except ConnectionError as e:
        print("ERROR:", e)
"""


@pytest.mark.parametrize("offline_env", [{"HF_ENDPOINT": "http://127.0.0.1:9"}, {"HF_HUB_OFFLINE": "1"}])
def test_offline_hub_source_fails_at_once_naming_data_options(tmp_path, offline_env):
    """No network (an endpoint that refuses connections) or HF_HUB_OFFLINE with an empty HF cache:
    the Hub dataset and the Hub tokenizer fail with the local data= options, without retry loops
    (the subprocess timeout is only a guard)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(offline_env, HF_HOME=str(tmp_path / "hf_home"))
    out = subprocess.run(
        [sys.executable, "-c", OFFLINE_SCRIPT.format(cache=str(tmp_path / "cache"))],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    errors = [line for line in out.stdout.splitlines() if line.startswith("ERROR:")]
    assert len(errors) == 2, out.stdout + out.stderr
    dataset_err, tokenizer_err = errors
    assert "Skylion007/openwebtext" in dataset_err and "GPT-2 tokenizer" in tokenizer_err
    for msg in errors:
        for name in ("data=stdlib", "data=tinyshakespeare", "data=wikitext2", "data=imdb"):
            assert name in msg
        assert "data=openwebtext" not in msg  # only sources that work offline are suggested
    assert "data.tokenizer=bytes" in tokenizer_err
    assert "Retry" not in out.stderr  # no retry loop was entered


# ----------------------------------------------------------------------------- configs


# The language-modelling data configs; the bases (_*.yaml) are no choice, and the other tasks' data
# configs are tested in tests/test_data_tasks.py.
OTHER_TASK_DATA = ("stdlib-mlm", "imdb-classify")
LM_CONFIGS = sorted(
    p.stem for p in (REPO / "configs" / "data").glob("[!_]*.yaml") if p.stem not in OTHER_TASK_DATA
)


@pytest.mark.parametrize("name", LM_CONFIGS)
def test_data_configs_instantiate(name, tmp_path):
    with initialize_config_dir(config_dir=str(REPO / "configs" / "data"), version_base="1.3"):
        cfg = compose(name, overrides=[f"data_root={tmp_path}", f"cache_dir={tmp_path / 'cache'}"])
    assert cfg._target_ == "data.lm.LMDataModule"
    for key in ("seq_len", "batch_size", "num_workers", "seed", "vocab_size", "tokenizer"):
        assert key in cfg, key
    assert cfg.vocab_size == (257 if cfg.tokenizer == "bytes" else 50257)
    if cfg.source == "local":  # empty data_root: the error names the missing path
        with pytest.raises(InstantiationException, match="does not exist") as e:  # Hydra wraps the error
            instantiate(cfg)
        assert isinstance(e.value.__cause__, FileNotFoundError) and str(tmp_path) in str(e.value)
        if (SHARED_DATA / "text-core.tar.xz").is_file():
            cfg.data_root = str(SHARED_DATA)
            instantiate(cfg)  # construction checks paths only: no extraction, no tokenizing
    else:
        dm = instantiate(cfg)
        assert dm.vocab_size == cfg.vocab_size
    assert not (tmp_path / "cache").exists()
