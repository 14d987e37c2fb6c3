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
