"""ShardDataset: streaming clips from real shards, split across workers and ranks."""
import pytest
import torch
from click.testing import CliRunner
from torch.utils.data import DataLoader

from avsprep.cli import main as avsprep_main
from avstrain.data import Augmentation, ShardDataset
from helpers import crops_args, make_dataset


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    dataset = make_dataset(root / "raw", clips=30)
    out = root / "shards"
    result = CliRunner().invoke(avsprep_main, crops_args(dataset, out) + ["--clips-per-shard", "4"])
    assert result.exit_code == 0, result.output
    return out


def names(dataset, **loader):
    return [name for batch in DataLoader(dataset, batch_size=None, **loader) for name in [batch["name"]]]


def test_items_are_uint8_clips_with_every_field(shards):
    item = next(iter(ShardDataset(shards, split="train")))
    assert item["frames"].dtype == torch.uint8 and item["frames"].shape == (3, 32, 32, 3)
    assert item["crops"].shape == (3, 24, 24, 3) and item["audio"].shape == (3, 128)
    assert item["masks"].shape == (3, 32, 32) and item["mask_valid"].dtype == torch.bool
    assert isinstance(item["name"], str) and item["label"].ndim == 0


def test_eval_sees_every_clip_once_across_workers(shards):
    dataset = ShardDataset(shards, split="train", shuffle=False)
    expected = sorted(f"clip{i:03d}" for i in range(0, 30, 3))
    assert sorted(names(dataset)) == expected
    assert sorted(names(dataset, num_workers=2)) == expected


def test_ranks_and_workers_are_disjoint_and_cover_the_epoch(shards):
    seen = []
    for rank in range(2):
        dataset = ShardDataset(shards, split="train", seed=3, rank=rank, world_size=2)
        dataset.set_epoch(1)
        got = names(dataset, num_workers=2)
        assert len(got) == len(dataset) == 5
        seen.extend(got)
    assert len(seen) == len(set(seen)) == 10  # 10 train clips, 2 ranks: nothing twice, nothing left out


def test_order_is_deterministic_per_seed_and_epoch(shards):
    def order(seed, epoch):
        dataset = ShardDataset(shards, split="train", seed=seed, buffer_size=4)
        dataset.set_epoch(epoch)
        return names(dataset)

    assert order(0, 0) == order(0, 0)
    assert order(0, 0) != order(0, 1) and sorted(order(0, 0)) == sorted(order(0, 1))
    assert order(0, 0) != order(1, 0)


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("skip_batches", [1, 2, 3, 5])
def test_skip_resumes_mid_epoch(shards, num_workers, skip_batches):
    """After k batches, a resumed DataLoader yields exactly the rest of the uninterrupted epoch."""
    dataset = ShardDataset(shards, split="train", seed=5, augmentation=Augmentation())

    def batches():
        loader = DataLoader(dataset, batch_size=3, num_workers=num_workers)
        return [(b["name"], b["frames"]) for b in loader]

    dataset.set_epoch(2)
    full = batches()
    dataset.set_epoch(2, skip_batches=skip_batches, batch_size=3)
    resumed = batches()
    assert [names for names, _ in resumed] == [names for names, _ in full[skip_batches:]]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(resumed, full[skip_batches:]))  # same augmentation


def test_augmentation_flips_clip_consistently(shards):
    plain = next(iter(ShardDataset(shards, split="val", shuffle=False)))
    flipped = next(iter(ShardDataset(shards, split="val", shuffle=False,
                                     augmentation=Augmentation(flip=1.0, brightness=0.0, contrast=0.0))))
    assert torch.equal(flipped["masks"], plain["masks"].flip(-1))
    assert torch.equal(flipped["frames"], plain["frames"].flip(-2))
    torch.testing.assert_close(flipped["boxes"][:, 0, 0], 1 - plain["boxes"][:, 0, 2])


def test_unknown_split_is_an_input_error(shards):
    from avsprep.errors import InputError

    with pytest.raises(InputError, match="no clips of split"):
        ShardDataset(shards, split="holdout")


def test_open_shards_are_bounded_and_reads_stay_exact(tmp_path):
    """Reading many shards keeps at most MAX_OPEN_SHARDS files open (memory flat in the dataset size), and a
    shard closed and reopened later gives the same clips."""
    import h5py

    from avstrain.data import MAX_OPEN_SHARDS

    dataset = make_dataset(tmp_path / "raw", clips=60)  # a third of them train: 20 one-clip shards
    out = tmp_path / "shards"
    result = CliRunner().invoke(avsprep_main, crops_args(dataset, out) + ["--clips-per-shard", "1"])
    assert result.exit_code == 0, result.output
    reader = ShardDataset(out, split="train", shuffle=True, seed=1)
    seen = {}
    for _ in range(2):  # the second pass reopens shards closed during the first
        for item in reader:
            assert len(reader.reader._open) <= MAX_OPEN_SHARDS
            seen.setdefault(item["name"], []).append(item["frames"])
    assert len(seen) == 20 and all(torch.equal(a, b) for a, b in seen.values())
    with h5py.File(out / "shard-00003.h5", "r") as handle:
        name = handle["name"].asstr()[0]
        assert torch.equal(seen[name][0], torch.as_tensor(handle["frames"][0]))


def _reference_augmentation(clip, augmentation, rng):
    """The augmentation as NumPy copies wrote it before it went in place through OpenCV: the outputs must not move."""
    import numpy as np

    if rng.random() < augmentation.flip:
        for key in ("frames", "masks", "other_masks", "crops"):
            if key in clip:
                clip[key] = np.ascontiguousarray(clip[key][:, :, ::-1])
        boxes = clip["boxes"].copy()
        boxes[..., 0], boxes[..., 2] = 1.0 - clip["boxes"][..., 2], 1.0 - clip["boxes"][..., 0]
        clip["boxes"] = boxes
    brightness = 1.0 + rng.uniform(-augmentation.brightness, augmentation.brightness)
    contrast = 1.0 + rng.uniform(-augmentation.contrast, augmentation.contrast)
    for key in ("frames", "crops"):
        mean = clip[key].mean(dtype=np.float32)
        table = np.clip((np.arange(256, dtype=np.float32) - mean) * contrast + mean * brightness, 0, 255)
        clip[key] = table.astype(np.uint8)[clip[key]]


def test_augmentation_in_place_gives_the_reference_outputs():
    import numpy as np

    from avstrain.data import _apply_augmentation

    rng = np.random.default_rng(0)
    for seed in range(40):
        t, s = 1 + seed % 5, (16, 33, 224)[seed % 3]
        clip = {"frames": rng.integers(0, 256, (t, s, s, 3), dtype=np.uint8),
                "crops": rng.integers(100, 256, (t, 24, 24, 3), dtype=np.uint8),
                "masks": rng.integers(0, 2, (t, s, s), dtype=np.uint8),
                "other_masks": rng.integers(0, 2, (t, s, s), dtype=np.uint8),
                "boxes": rng.random((t, 4, 4), dtype=np.float32)}
        expected = {key: value.copy() for key, value in clip.items()}
        augmentation = Augmentation(flip=(0.5, 1.0)[seed % 2])
        _reference_augmentation(expected, augmentation, np.random.default_rng(seed))
        _apply_augmentation(clip, augmentation, np.random.default_rng(seed))
        for key in clip:
            assert clip[key].dtype == expected[key].dtype and np.array_equal(clip[key], expected[key]), (seed, key)


def test_worker_batches_equal_in_process_batches(shards):
    """Batches collated in a worker (one shared block, `collate_clips`) equal those collated in process, key for key."""
    dataset = ShardDataset(shards, split="train", seed=2, augmentation=Augmentation())
    in_process = list(DataLoader(dataset, batch_size=3))
    from_workers = list(DataLoader(dataset, batch_size=3, num_workers=1))
    assert len(in_process) == len(from_workers) == 4
    for mine, reference in zip(from_workers, in_process):
        assert type(mine) is dict and list(mine) == list(reference)
        assert mine["name"] == reference["name"]
        for key, value in reference.items():
            if key != "name":  # compared as bytes: boxes are NaN-padded
                assert value.dtype == mine[key].dtype and value.numpy().tobytes() == mine[key].numpy().tobytes(), key


def test_a_worker_sends_a_batch_as_one_block(monkeypatch):
    """In a worker, `collate_clips` stacks every tensor into one shared block: pickled as that block, unpickled as a
    plain dict whose image-sized tensors are views of it and whose small ones are copies."""
    import pickle

    from multiprocessing.reduction import ForkingPickler

    import torch.multiprocessing  # noqa: F401  (registers the reductions that share tensors)

    import avstrain.data as data

    monkeypatch.setattr(data, "get_worker_info", lambda: object())  # as inside a DataLoader worker
    items = [data.ClipItem(frames=torch.full((2, 64, 64, 3), i, dtype=torch.uint8), label=torch.tensor(i),
                           boxes=torch.rand(2, 4, 4), masks=torch.ones(2, 128, 128, dtype=torch.uint8), name=f"c{i}")
             for i in range(4)]
    batch = pickle.loads(ForkingPickler.dumps(data.collate_clips(items)))
    assert type(batch) is dict and list(batch) == ["frames", "label", "boxes", "masks", "name"]
    assert batch["name"] == ["c0", "c1", "c2", "c3"] and batch["label"].tolist() == [0, 1, 2, 3]
    assert torch.equal(batch["frames"][:, 0, 0, 0, 0], torch.arange(4, dtype=torch.uint8))
    assert torch.equal(batch["boxes"], torch.stack([item["boxes"] for item in items]))
    block = batch["frames"].untyped_storage().data_ptr()
    assert batch["masks"].untyped_storage().data_ptr() == block and batch["frames"].is_shared()
    assert batch["label"].untyped_storage().data_ptr() != block


def test_items_kept_are_not_overwritten_by_later_reads(shards):
    """Reads reuse their buffers only once no item uses them: items kept past the reuse limit stay intact."""
    kept = [item for _ in range(4) for item in ShardDataset(shards, split="train", shuffle=False)]  # 40 items
    fresh = [item for item in ShardDataset(shards, split="train", shuffle=False)]
    for index, item in enumerate(kept):
        assert torch.equal(item["frames"], fresh[index % len(fresh)]["frames"])
        assert torch.equal(item["masks"], fresh[index % len(fresh)]["masks"])
