"""Tests of the data building blocks and the other tasks' data modules: the generic checked cache
(data/cache.py), masked-LM windows (data/mlm.py) and labelled documents (data/classification.py).

Real components throughout: files on disk, a real Lightning Trainer on CPU for resume, real DataLoader
worker processes, the real IMDb tarball of the offline data folder (skipped when absent).
"""

import hashlib
import json
import logging
import pickle
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

from data import corpus, text
from data.cache import MISSING, load_arrays, write_array
from data.classification import TextClassificationDataModule
from data.mlm import IGNORE, MaskedLMDataModule, mask_tokens
from data.tokenizer import ByteTokenizer

IMDB = SHARED_DATA / "aclImdb_labeled.tar.xz"
TEXT_CORE = SHARED_DATA / "text-core.tar.xz"


# ----------------------------------------------------------------------------- the generic cache


def _entry(folder: Path) -> dict[str, tuple[Path, str]]:
    return {"tokens": (folder / "tokens.bin", "uint16"), "offsets": (folder / "offsets.bin", "int64")}


def _write_entry(folder: Path, key: dict, tokens: np.ndarray, offsets: np.ndarray) -> None:
    write_array(folder / "tokens.bin", "tokens", "uint16", np.array_split(tokens, 3), key, {"note": "x"})
    write_array(folder / "offsets.bin", "offsets", "int64", offsets, key)


def test_cache_round_trip_checks_and_rebuild_reasons(tmp_path):
    key = {"source": "abc", "version": 1}
    tokens = np.random.default_rng(0).integers(0, 65536, 1000).astype(np.uint16)
    offsets = np.array([0, 10, 600, 1000])
    spec = _entry(tmp_path)
    assert load_arrays(spec, key) == (None, MISSING)

    _write_entry(tmp_path, key, tokens, offsets)
    arrays, why = load_arrays(spec, key)
    assert why == "" and set(arrays) == {"tokens", "offsets"}
    assert np.array_equal(np.asarray(arrays["tokens"]), tokens) and arrays["tokens"].dtype == np.uint16
    assert np.array_equal(arrays["offsets"][1:3], offsets[1:3]) and len(arrays["offsets"]) == 4
    side = json.loads((tmp_path / "tokens.json").read_text())
    assert side["key"] == key and side["name"] == "tokens" and side["shape"] == [1000] and side["note"] == "x"
    assert (
        side["bytes"] == 2000 and side["sha256"] == hashlib.sha256(tokens.astype("<u2").tobytes()).hexdigest()
    )
    assert not list(tmp_path.glob(".*"))  # no temporary files left behind
    # a CachedArray pickles as its path (a DataLoader worker maps the file itself)
    arrays["tokens"][0]  # opens the map
    restored = pickle.loads(pickle.dumps(arrays["tokens"]))
    assert len(pickle.dumps(arrays["tokens"])) < 2000 and np.array_equal(np.asarray(restored), tokens)

    good = (tmp_path / "tokens.bin").read_bytes()
    flipped = bytearray(good)
    flipped[100] ^= 1
    cases = [
        (
            lambda: (tmp_path / "tokens.bin").write_bytes(good[:1000]),
            {},
            "size 1000 bytes, sidecar says 2000",
        ),
        (lambda: (tmp_path / "tokens.bin").write_bytes(bytes(flipped)), {}, "sha256 mismatch"),
        (lambda: (tmp_path / "offsets.json").unlink(), {}, "no sidecar"),
        (lambda: None, {"version": 2}, "does not match"),  # another key: another configuration
        (lambda: (tmp_path / "offsets.bin").unlink(), {}, "array file missing"),
    ]
    for corrupt, key_change, reason in cases:
        corrupt()
        arrays, why = load_arrays(spec, key | key_change)
        assert arrays is None and reason in why, (reason, why)
        if not key_change:
            assert why.startswith(str(tmp_path))  # names the bad file
        _write_entry(tmp_path, key, tokens, offsets)  # what a data module does: rebuild
        assert load_arrays(spec, key)[0] is not None
    # the size is always checked, the sha256 only when asked
    (tmp_path / "tokens.bin").write_bytes(bytes(flipped))
    assert load_arrays(spec, key, verify_checksum=False)[0] is not None
    # an array under another name (e.g. a swapped split) is not taken for this one
    (tmp_path / "offsets.bin").write_bytes((tmp_path / "tokens.bin").read_bytes())
    (tmp_path / "offsets.json").write_text((tmp_path / "tokens.json").read_text())
    assert "does not match" in load_arrays({"offsets": (tmp_path / "offsets.bin", "uint16")}, key)[1]


# ----------------------------------------------------------------------------- masked LM


def test_masking_statistics_follow_bert():
    """15% chosen; of those 80% mask, 10% random real tokens, 10% kept; labels exactly where chosen."""
    tokens = torch.from_numpy(np.random.default_rng(0).integers(0, 257, 500_000))
    replacements = np.arange(256)  # bytes without EOS (256) and the mask (257)
    input_ids, labels = mask_tokens(tokens, np.random.default_rng(1), 0.15, 257, replacements)
    assert input_ids.dtype == labels.dtype == torch.int64 and input_ids.shape == labels.shape == tokens.shape
    chosen = labels != IGNORE
    n = chosen.sum().item()
    assert n / tokens.numel() == pytest.approx(0.15, abs=0.003)
    assert torch.equal(labels[chosen], tokens[chosen])
    assert torch.equal(input_ids[~chosen], tokens[~chosen])
    masked = input_ids[chosen] == 257
    replaced = ~masked & (input_ids[chosen] != tokens[chosen])  # a random draw may equal the token: 1/256
    assert masked.float().mean().item() == pytest.approx(0.8, abs=0.01)
    assert replaced.float().mean().item() == pytest.approx(0.1 * 255 / 256, abs=0.006)
    assert (~masked & ~replaced).float().mean().item() == pytest.approx(0.1 + 0.1 / 256, abs=0.006)
    assert (input_ids[chosen][replaced] < 256).all()  # replacements are real tokens, never EOS
    # another probability
    _, labels = mask_tokens(tokens, np.random.default_rng(2), 0.3, 257, replacements)
    assert (labels != IGNORE).float().mean().item() == pytest.approx(0.3, abs=0.003)


SEQ, BATCH, EPOCH_BATCHES = 16, 4, 5


@pytest.fixture(scope="module")
def mlm_text(tmp_path_factory) -> Path:
    """train.txt: exactly BATCH * EPOCH_BATCHES windows of SEQ bytes (+ EOS, left over); val.txt."""
    d = tmp_path_factory.mktemp("mlm_text")
    src = "".join(ch for ch in Path(json.__file__).read_text() if ord(ch) < 128)
    n = SEQ * BATCH * EPOCH_BATCHES
    (d / "train.txt").write_text(src[:n])
    (d / "val.txt").write_text(src[n : n + 8 * SEQ])
    return d


def mlm_dm(root: Path, cache: Path, **kw) -> MaskedLMDataModule:
    args = dict(
        source="local", path="train.txt", val_path="val.txt", data_root=str(root), seq_len=SEQ,
        batch_size=BATCH, num_workers=0, seed=3, cache_dir=str(cache),
    )  # fmt: skip
    return MaskedLMDataModule(**(args | kw))


def _clone(loader) -> list[dict[str, torch.Tensor]]:
    return [{k: v.clone() for k, v in batch.items()} for batch in loader]


def _labels_by_window(batches: list[dict[str, torch.Tensor]], order: np.ndarray) -> dict[int, torch.Tensor]:
    """{window index: its labels row} from an epoch's batches and the sampler's (N, B) order."""
    return {
        int(i): b["labels"][row] for b, idx in zip(batches, order, strict=True) for row, i in enumerate(idx)
    }


def test_mlm_batches_mask_the_token_stream(mlm_text, tmp_path):
    dm = mlm_dm(mlm_text, tmp_path)
    assert (dm.vocab_size, dm.mask_token_id) == (258, 257)
    dm.setup()
    assert len(dm.train_set) == BATCH * EPOCH_BATCHES
    tokens = np.fromfile(dm.token_dir() / "train.bin", dtype="<u2").astype(np.int64)
    assert tokens.tolist() == list((mlm_text / "train.txt").read_bytes()) + [256]
    loader = dm.train_dataloader()
    order = loader.sampler.epoch_order(0)
    batches = _clone(loader)
    assert len(batches) == EPOCH_BATCHES
    for batch, idx in zip(batches, order, strict=True):
        assert batch.keys() == {"input_ids", "labels"}
        x, y = batch["input_ids"], batch["labels"]
        assert x.shape == y.shape == (BATCH, SEQ) and x.dtype == y.dtype == torch.int64
        original = torch.from_numpy(np.stack([tokens[i * SEQ : (i + 1) * SEQ] for i in idx]))
        chosen = y != IGNORE
        assert torch.equal(y[chosen], original[chosen]) and torch.equal(x[~chosen], original[~chosen])
        assert ((x[chosen] == 257) | (x[chosen] < 256)).all()
    # epochs mask anew: epoch 1 reads the same windows in another order, masked differently
    loader.sampler.set_epoch(1)
    labels = [
        _labels_by_window(batches, order),
        _labels_by_window(_clone(loader), loader.sampler.epoch_order(1)),
    ]
    assert labels[0].keys() == labels[1].keys() == set(range(BATCH * EPOCH_BATCHES))
    assert sum(not torch.equal(labels[0][i], labels[1][i]) for i in labels[0]) > len(labels[0]) // 2
    # validation masks the same way every time, and differently from the training stream
    val = [_clone(dm.val_dataloader()) for _ in range(2)]
    assert all(torch.equal(a["labels"], b["labels"]) for a, b in zip(*val, strict=True))
    assert all((b["labels"] != IGNORE).any() for b in val[0])


def test_mlm_masking_rate_on_the_stdlib_corpus(tmp_path):
    dm = MaskedLMDataModule(
        stdlib_max_bytes=100_000, seq_len=64, batch_size=8, num_workers=0, cache_dir=str(tmp_path)
    )
    dm.setup()
    labels = torch.cat([b["labels"] for b in dm.train_dataloader()])
    assert labels.numel() > 50_000
    assert (labels != IGNORE).float().mean().item() == pytest.approx(0.15, abs=0.005)


def test_mlm_batches_do_not_depend_on_workers(mlm_text, tmp_path):
    runs = []
    for workers in (0, 2):
        dm = mlm_dm(mlm_text, tmp_path, num_workers=workers)
        dm.setup()
        loader = dm.train_dataloader()
        runs.append([])
        for epoch in (0, 1):
            loader.sampler.set_epoch(epoch)
            runs[-1] += _clone(loader)
        runs[-1] += _clone(dm.val_dataloader())
    assert len(runs[0]) == len(runs[1]) == 2 * EPOCH_BATCHES + 2
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])


class BatchRecorder(L.LightningModule):
    """A one-parameter model that records a hash of every training batch (all its tensors) it sees."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.seen: list[str] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(
            hashlib.sha1(b"".join(batch[k].numpy().tobytes() for k in sorted(batch))).hexdigest()
        )
        return (self.w - batch["labels"].float().mean()).pow(2).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(dm, max_steps: int, root: Path, ckpt_every: int | None = None, ckpt_path=None) -> BatchRecorder:
    model = BatchRecorder()
    trainer = L.Trainer(
        max_steps=max_steps, accelerator="cpu", devices=1, limit_val_batches=0, num_sanity_val_steps=0,
        logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=bool(ckpt_every),
        callbacks=[ModelCheckpoint(dirpath=root, every_n_train_steps=ckpt_every, save_top_k=-1)] if ckpt_every else [],
        default_root_dir=root,
    )  # fmt: skip
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    assert trainer.global_step == max_steps
    return model


@pytest.mark.parametrize("k, workers", [(EPOCH_BATCHES + 2, 0), (3, 1)])
def test_mlm_resume_sees_the_same_masked_batches(mlm_text, tmp_path, caplog, k, workers):
    """Interrupted at step k (mid-epoch 1, or mid-epoch 0) and resumed from the checkpoint: the same
    batches, masks included, as an uninterrupted run of 2.6 epochs."""
    caplog.set_level(logging.INFO, logger="data.mlm")
    n = 2 * EPOCH_BATCHES + 3
    ref = _fit(mlm_dm(mlm_text, tmp_path / "cache", num_workers=workers), n, tmp_path / "ref")
    first = _fit(mlm_dm(mlm_text, tmp_path / "cache", num_workers=workers), k, tmp_path / "a", ckpt_every=k)
    (ckpt,) = (tmp_path / "a").glob(f"*step={k}.ckpt")
    resumed = _fit(
        mlm_dm(mlm_text, tmp_path / "cache", num_workers=workers), n, tmp_path / "b", ckpt_path=ckpt
    )
    assert len(ref.seen) == n and first.seen + resumed.seen == ref.seen
    assert len(set(ref.seen)) == n  # epochs differ: no batch repeats
    assert any(f"global_step {k}" in r.getMessage() for r in caplog.records if r.name == "data.mlm")


class MaskingTokenizer(ByteTokenizer):
    """Bytes, with byte 0 standing for a mask token of the tokenizer's own."""

    mask_token_id = 0


def test_a_tokenizer_with_its_own_mask_token_keeps_its_vocabulary(monkeypatch, mlm_text, tmp_path):
    monkeypatch.setattr(text, "load_tokenizer", lambda *a: MaskingTokenizer())
    dm = mlm_dm(mlm_text, tmp_path)
    assert (dm.mask_token_id, dm.vocab_size) == (0, 257)
    assert dm.replacement_ids().tolist() == list(range(1, 256))
    with pytest.raises(ValueError, match="data.vocab_size=258 but tokenizer='bytes' has 257 tokens. Fix"):
        mlm_dm(mlm_text, tmp_path, vocab_size=258).prepare_data()
    monkeypatch.undo()
    with pytest.raises(ValueError, match=r"has 257 tokens \+ 1 added \(mask\). Fix: set data.vocab_size=258"):
        mlm_dm(mlm_text, tmp_path, vocab_size=257).prepare_data()
    with pytest.raises(ValueError, match="data.mlm_probability"):
        mlm_dm(mlm_text, tmp_path, mlm_probability=1.5)


# ----------------------------------------------------------------------------- classification


def class_folders(root: Path, docs: dict[str, list[str]]) -> Path:
    for label, texts in docs.items():
        (root / label).mkdir(parents=True)
        for i, t in enumerate(texts):
            (root / label / f"{i:03d}.txt").write_text(t, encoding="utf-8")
    return root


TRAIN_DOCS = {
    "neg": ["ab", "a" * 40, "caf\u00e9 au lait", "b"],
    "pos": ["xyz", "hello world", "yes!" * 9, "ok"],
}
VAL_DOCS = {"neg": ["q", "no"], "pos": ["rr", "yes"]}


def tiny_classes(root: Path, **kw) -> TextClassificationDataModule:
    if not (root / "train").exists():
        class_folders(root / "train", TRAIN_DOCS)
        class_folders(root / "val", VAL_DOCS)
    args = dict(
        path="train", val_path="val", classes=["neg", "pos"], data_root=str(root), seq_len=8, batch_size=2,
        num_workers=0, cache_dir=str(root / "cache"),
    )  # fmt: skip
    return TextClassificationDataModule(**(args | kw))


def check_items(ds, texts: list[str], labels: list[int], seq_len: int, pad: int, encode) -> None:
    """Item d holds document d's first seq_len tokens, then pad; mask == (position < length); its label."""
    assert len(ds) == len(texts)
    for d, (t, label) in enumerate(zip(texts, labels, strict=True)):
        item = ds[d]
        ids = encode(t)
        n = min(len(ids), seq_len)
        assert item["input_ids"].shape == item["attention_mask"].shape == (seq_len,)
        assert item["input_ids"].dtype == torch.int64 and item["attention_mask"].dtype == torch.bool
        assert item["input_ids"][:n].tolist() == ids[:n]
        assert torch.equal(item["attention_mask"], torch.arange(seq_len) < n)
        assert (item["input_ids"][~item["attention_mask"]] == pad).all()
        assert not (item["input_ids"][item["attention_mask"]] == pad).any()
        assert item["labels"].shape == () and int(item["labels"]) == label


def test_classification_items_batches_and_attributes(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="data.classification")
    dm = tiny_classes(tmp_path)
    assert (dm.num_classes, dm.vocab_size, dm.pad_token_id, dm.seq_len) == (2, 258, 257, 8)
    dm.setup()
    texts = [t for c in ("neg", "pos") for t in TRAIN_DOCS[c]]
    check_items(dm.train_set, texts, [0] * 4 + [1] * 4, 8, 257, lambda t: list(t.encode()))
    check_items(dm.val_set, [t for c in ("neg", "pos") for t in VAL_DOCS[c]], [0, 0, 1, 1], 8, 257,
                lambda t: list(t.encode()))  # fmt: skip
    assert any("{'neg': 4, 'pos': 4}" in r.getMessage() for r in caplog.records)  # class counts logged
    loader = dm.train_dataloader()
    batches = _clone(loader)
    assert len(batches) == 4
    for b in batches:
        assert b.keys() == {"input_ids", "attention_mask", "labels"}
        assert b["input_ids"].shape == b["attention_mask"].shape == (2, 8) and b["labels"].shape == (2,)
        assert b["labels"].dtype == torch.int64
    seen = sorted(row.tolist() for b in batches for row in b["input_ids"])
    assert seen == sorted(dm.train_set[d]["input_ids"].tolist() for d in range(8))  # each document once
    assert (
        loader.state_dict()["classes"] == ["neg", "pos"]
        and len(loader.state_dict()["cache_key_sha256"]) == 64
    )


def test_classification_cache_reused_rebuilt_and_keyed_by_content(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="data.classification")

    def builds() -> list[str]:
        return [r.getMessage() for r in caplog.records if "building classification cache" in r.getMessage()]

    tiny_classes(tmp_path).setup()
    assert len(builds()) == 2  # train and validation
    tiny_classes(tmp_path).setup()
    assert len(builds()) == 2  # reused
    (labels,) = (tmp_path / "cache" / "classification").glob("train-*/labels.bin")
    labels.write_bytes(labels.read_bytes()[:-8])
    dm = tiny_classes(tmp_path)
    dm.setup()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(labels) in warnings[0] and "size" in warnings[0]
    assert len(builds()) == 3 and [int(dm.train_set[d]["labels"]) for d in range(8)] == [0] * 4 + [1] * 4
    (tmp_path / "train" / "pos" / "000.txt").write_text("changed")  # new content: a new key
    dm = tiny_classes(tmp_path)
    dm.setup()
    assert len(builds()) == 4 and dm.train_set[4]["input_ids"][:7].tolist() == list(b"changed")
    assert not list((tmp_path / "cache" / "classification").glob("*/.*"))  # no temporary files


def test_classification_bad_arguments(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no class folder 'neutral'.*\\['neg', 'pos'\\]"):
        tiny_classes(tmp_path, classes=["neg", "neutral"]).setup()
    with pytest.raises(ValueError, match="num_classes=3 but data.classes has 2"):
        tiny_classes(tmp_path, num_classes=3)
    with pytest.raises(ValueError, match="at least two distinct"):
        tiny_classes(tmp_path, classes=["neg", "neg"])
    with pytest.raises(
        ValueError, match="data.vocab_size=257 but tokenizer='bytes' has 257 tokens \\+ 1 added"
    ):
        tiny_classes(tmp_path, vocab_size=257).setup()
    with pytest.raises(ValueError, match="the train split has 8 documents, fewer than the 16 needed"):
        tiny_classes(tmp_path, batch_size=16).setup()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        tiny_classes(tmp_path, val_path="nowhere")


@pytest.mark.skipif(not TEXT_CORE.is_file(), reason=f"offline data not found: {TEXT_CORE}")
def test_classification_with_the_gpt2_bpe(tmp_path):
    dm = tiny_classes(tmp_path, tokenizer=str(TEXT_CORE / "gpt2"), seq_len=4)
    assert (dm.vocab_size, dm.pad_token_id) == (50258, 50257)
    dm.setup()
    tok = dm.tokenizer
    texts = [t for c in ("neg", "pos") for t in TRAIN_DOCS[c]]
    encode = lambda t: tok.encode_documents([t], eos=False)[0].tolist()  # noqa: E731
    assert encode("hello world") == [31373, 995]  # GPT-2's ids, no EOS
    check_items(dm.train_set, texts, [0] * 4 + [1] * 4, 4, 50257, encode)


@pytest.fixture(scope="module")
def imdb(tmp_path_factory) -> TextClassificationDataModule:
    if not IMDB.is_file():
        pytest.skip(f"offline data not found: {IMDB}")
    with initialize_config_dir(config_dir=str(REPO / "configs" / "data"), version_base="1.3"):
        cfg = compose(
            "imdb-classify",
            overrides=[
                f"data_root={SHARED_DATA}",
                f"cache_dir={tmp_path_factory.mktemp('imdb')}",
                "num_workers=0",
            ],
        )
    dm = instantiate(cfg)
    dm.setup()
    return dm


def test_imdb_counts_labels_and_padding(imdb):
    """LRA Text's data: 12,500 negative and 12,500 positive reviews in train and in test, byte-level,
    truncated to seq_len (1024 here; LRA's 4000 is data.seq_len=4000)."""
    assert (imdb.num_classes, imdb.vocab_size, imdb.pad_token_id, imdb.seq_len) == (2, 258, 257, 1024)
    for split, ds in (("train", imdb.train_set), ("validation", imdb.val_set)):
        assert ds.class_counts(2) == [12_500, 12_500]
        docs = imdb.documents(split)
        assert [label for label, _, _ in docs] == np.asarray(ds.labels).tolist()
        assert all(p.parent.name == imdb.classes[label] for label, _, p in docs)  # labels match the folder
        lengths = np.diff(np.asarray(ds.offsets))
        assert (lengths > 0).all() and (lengths < imdb.seq_len).any() and (lengths > imdb.seq_len).any()
        sample = np.random.default_rng(0).choice(len(ds), 300, replace=False)
        check_items(
            torch.utils.data.Subset(ds, sample.tolist()),
            [docs[d][2].read_text(encoding="utf-8") for d in sample], [docs[d][0] for d in sample],
            imdb.seq_len, 257, lambda t: list(t.encode()),
        )  # fmt: skip
    batch = next(iter(imdb.train_dataloader()))
    assert batch["input_ids"].shape == (8, 1024) and batch["attention_mask"].dtype == torch.bool


# ----------------------------------------------------------------------------- configs

TASK_CONFIGS = {
    "stdlib-mlm": "data.mlm.MaskedLMDataModule",
    "imdb-classify": "data.classification.TextClassificationDataModule",
}


@pytest.mark.parametrize("name", sorted(TASK_CONFIGS))
def test_task_data_configs_instantiate(name, tmp_path):
    with initialize_config_dir(config_dir=str(REPO / "configs" / "data"), version_base="1.3"):
        cfg = compose(name, overrides=[f"data_root={tmp_path}", f"cache_dir={tmp_path / 'cache'}"])
    assert cfg._target_ == TASK_CONFIGS[name]
    for key in ("seq_len", "batch_size", "num_workers", "seed", "vocab_size", "tokenizer", "verify_checksum"):
        assert key in cfg, key
    assert cfg.tokenizer == "bytes" and cfg.vocab_size == 258
    if name == "imdb-classify":
        assert cfg.classes == ["neg", "pos"] and cfg.num_classes == 2 and cfg.seq_len == 1024
        assert cfg.path.endswith("aclImdb/train") and cfg.val_path.endswith("aclImdb/test")
        with pytest.raises(InstantiationException, match="does not exist"):
            instantiate(cfg)  # empty data_root
        if IMDB.is_file():
            cfg.data_root = str(SHARED_DATA)
            dm = instantiate(cfg)  # construction checks paths only: no extraction, no tokenizing
            assert (dm.vocab_size, dm.num_classes, dm.pad_token_id) == (258, 2, 257)
    else:
        assert cfg.mlm_probability == 0.15 and cfg.source == "stdlib"
        dm = instantiate(cfg)
        assert (dm.vocab_size, dm.mask_token_id) == (258, 257)
    assert not (tmp_path / "cache").exists()


def test_data_options_list_choices_not_bases():
    options = corpus.data_options()
    assert "data=stdlib-mlm" in options and "data=imdb-classify" in options and "data=stdlib," in options
    assert "data=_" not in options


def test_token_files_of_the_earlier_sidecar_format_are_used_as_they_are(tmp_path, caplog):
    """A token cache written before arrays had names and shapes (sidecar: split, n_tokens) is not rebuilt:
    OpenWebText's takes hours to tokenize."""
    from data.lm import LMDataModule

    def dm():
        args = dict(source="stdlib", stdlib_max_bytes=100_000, seq_len=32, batch_size=4, num_workers=0)
        return LMDataModule(cache_dir=str(tmp_path), **args)

    caplog.set_level(logging.INFO, logger="data")
    first = dm()
    first.prepare_data()
    for side in first.token_dir().glob("*.json"):
        meta = json.loads(side.read_text())
        meta["split"], meta["n_tokens"] = meta.pop("name"), meta.pop("shape")[0]
        side.write_text(json.dumps(meta))
    caplog.clear()
    again = dm()
    again.prepare_data()
    again.setup()
    assert not [r for r in caplog.records if "building token cache" in r.getMessage()]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
