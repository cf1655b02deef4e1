"""Checkpoint files: our safetensors writer against the library's reader, the background writer,
pruning that keeps the best, and metrics.jsonl cut back for a resume."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from policygrad import checkpoint


def test_write_safetensors_reads_back_through_the_library(tmp_path):
    flat = torch.arange(10, dtype=torch.float32)
    tensors = {"a.view": flat[2:6].view(2, 2), "b.other": flat[6:], "c.int": torch.tensor([1, -2], dtype=torch.int64),
               "d.half": torch.randn(3, dtype=torch.bfloat16), "e.scalar": torch.tensor(3.5), "f.empty": torch.zeros(0)}
    checkpoint.write_safetensors(tmp_path / "ours.safetensors", tensors, {"format": "pt"})
    loaded = load_file(str(tmp_path / "ours.safetensors"))
    assert loaded.keys() == tensors.keys()
    for k, v in tensors.items():
        assert loaded[k].dtype == v.dtype and torch.equal(loaded[k], v), k
    # the naive twin: the library's own writer (it needs copies of the views) gives the same tensors
    save_file({k: v.clone() for k, v in tensors.items()}, str(tmp_path / "lib.safetensors"))
    twin = load_file(str(tmp_path / "lib.safetensors"))
    assert all(torch.equal(twin[k], loaded[k]) for k in tensors)


def test_background_writer_is_whole_after_wait_and_prunes_all_but_newest_and_best(tmp_path):
    writer = checkpoint.CheckpointWriter()
    w = torch.randn(1000)
    for update in range(1, 6):
        w.add_(1.0)
        writer.save(tmp_path, f"update-{update:06d}", {"model.safetensors": {"w": w}}, {"config": {}, "u": update},
                    keep=2, protect="update-000002")
        writer.wait()  # as the trainer does before it changes the tensors again
        assert torch.equal(load_file(str(checkpoint.latest(tmp_path) / "model.safetensors"))["w"], w)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.is_dir())
    assert names == [".spare", "update-000002", "update-000004", "update-000005"]
    assert checkpoint.latest(tmp_path).name == "update-000005"
    # the next checkpoint is written over the spare's file, in place (same inode)
    inode = (tmp_path / "checkpoints" / ".spare" / "model.safetensors").stat().st_ino
    writer.save(tmp_path, "update-000006", {"model.safetensors": {"w": w + 1}}, {"config": {}}, keep=2)
    written = writer.wait() / "model.safetensors"
    assert written.stat().st_ino == inode and torch.equal(load_file(str(written))["w"], w + 1)


def test_a_killed_write_leaves_a_folder_the_next_checkpoint_reuses(tmp_path):
    writer = checkpoint.CheckpointWriter(background=False)
    writer.save(tmp_path, "update-000001", {"model.safetensors": {"w": torch.ones(5)}}, {"config": {}})
    torn = tmp_path / "checkpoints" / ".tmp-update-000002"
    torn.mkdir()
    (torn / "model.safetensors").write_bytes(b"half")
    writer.save(tmp_path, "update-000002", {"model.safetensors": {"w": torch.zeros(5)}}, {"config": {}})
    assert not torn.exists() and checkpoint.latest(tmp_path).name == "update-000002"
    assert torch.equal(load_file(str(checkpoint.latest(tmp_path) / "model.safetensors"))["w"], torch.zeros(5))


def test_a_failed_background_write_is_reported_at_wait(tmp_path):
    writer = checkpoint.CheckpointWriter()
    writer.save(tmp_path, "update-000001", {"model.safetensors": {"w": torch.zeros(2, dtype=torch.complex64)}},
                {"config": {}})
    with pytest.raises(checkpoint.CheckpointError, match="writing a checkpoint failed"):
        writer.wait()
    assert checkpoint.latest(tmp_path) is None  # nothing half-written is pointed at


def test_cut_metrics_keeps_updates_up_to_the_checkpoint_and_drops_a_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"update": u, "x": u * 0.5}) + "\n" for u in range(1, 6)) + '{"update": 6, "x"')
    assert checkpoint.cut_metrics(path, 3) == 3
    assert [json.loads(line)["update"] for line in path.read_text().splitlines()] == [1, 2, 3]
    assert checkpoint.cut_metrics(path, 10) == 3
