"""Checkpoint files: our safetensors writer against the library's reader, the background writer,
pruning that keeps the best, and metrics.jsonl cut back for a resume."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from policygrad import checkpoint, tensorfile


def _awkward_tensors() -> dict[str, torch.Tensor]:
    """Views of one buffer (one long run and a ragged one), odd sizes, dtypes, a scalar, an empty
    and a non-contiguous tensor: every case the writer's layout and alignment must handle."""
    flat = torch.randn(300_001)
    return {"a.view": flat[2:100_002].view(500, 200), "b.rest": flat[100_002:], "c.int": torch.tensor([1, -2]),
            "d.half": torch.randn(3, dtype=torch.bfloat16), "e.scalar": torch.tensor(3.5), "f.empty": torch.zeros(0),
            "g.transposed": torch.randn(30, 41).t(), "h.other": torch.randn(5_003)}


def _opened_without_o_direct(path):
    return os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)


@pytest.mark.parametrize("route", ["direct", "blocks-without-o-direct", "plain"])
def test_write_safetensors_reads_back_through_the_library(tmp_path, monkeypatch, route):
    """Each route against the library's own writer (which needs copies of the views) and reader.
    "blocks-without-o-direct" runs the whole-block composition on any file system."""
    if route == "blocks-without-o-direct":
        monkeypatch.setattr(tensorfile, "_open_direct", _opened_without_o_direct)
    tensors = _awkward_tensors()
    path = tmp_path / "ours.safetensors"
    path.write_bytes(b"x" * 3_000_000)  # an older, bigger file is overwritten in place and cut
    checkpoint.write_safetensors(path, tensors, {"format": "pt"}, direct=route != "plain")
    loaded = load_file(str(path))
    assert loaded.keys() == tensors.keys()
    for k, v in tensors.items():
        assert loaded[k].dtype == v.dtype and torch.equal(loaded[k], v), k
    save_file({k: v.contiguous().clone() for k, v in tensors.items()}, str(tmp_path / "lib.safetensors"))
    twin = load_file(str(tmp_path / "lib.safetensors"))
    assert all(torch.equal(twin[k], loaded[k]) for k in tensors)


def test_direct_and_plain_writes_give_the_same_bytes(tmp_path, monkeypatch):
    tensors = _awkward_tensors()
    checkpoint.write_safetensors(tmp_path / "plain", tensors, direct=False)
    checkpoint.write_safetensors(tmp_path / "direct", tensors)
    monkeypatch.setattr(tensorfile, "_open_direct", _opened_without_o_direct)
    checkpoint.write_safetensors(tmp_path / "blocks", tensors)
    plain = (tmp_path / "plain").read_bytes()
    assert (tmp_path / "direct").read_bytes() == plain and (tmp_path / "blocks").read_bytes() == plain


def test_a_flat_buffer_is_written_from_memory_not_through_the_bounce_buffer(tmp_path, monkeypatch):
    """The views of one flat buffer form one run placed at its address's offset within a block, so
    only the header and the run's ragged ends (under three blocks) are copied."""
    monkeypatch.setattr(tensorfile, "_open_direct", _opened_without_o_direct)
    bounced = []
    real = tensorfile._write_bounced
    monkeypatch.setattr(tensorfile, "_write_bounced", lambda fd, pieces, lo, hi, buf: (
        bounced.append(hi - lo), real(fd, pieces, lo, hi, buf)))
    flat = torch.randn(1_000_003)
    views = {f"layer{i}.weight": flat[i * 100_000:(i + 1) * 100_000] for i in range(10)}
    views["head.bias"] = flat[1_000_000:]
    path = tmp_path / "flat.safetensors"
    checkpoint.write_safetensors(path, views, {"format": "pt"})
    header_bytes = 8 + int.from_bytes(path.read_bytes()[:8], "little")
    assert (header_bytes - flat.data_ptr()) % tensorfile.BLOCK == 0  # the run sits as it does in memory
    assert sum(bounced) <= header_bytes + 3 * tensorfile.BLOCK < path.stat().st_size // 100
    assert all(torch.equal(v, load_file(str(path))[k]) for k, v in views.items())


def test_without_direct_io_the_file_is_written_the_plain_way(tmp_path, monkeypatch):
    monkeypatch.setattr(tensorfile, "_open_direct", lambda path: None)

    def no_direct_writes(*args):
        raise AssertionError("direct path taken without a direct descriptor")
    monkeypatch.setattr(tensorfile, "_write_direct", no_direct_writes)
    tensors = _awkward_tensors()
    checkpoint.write_safetensors(tmp_path / "fallback", tensors)
    checkpoint.write_safetensors(tmp_path / "plain", tensors, direct=False)
    assert (tmp_path / "fallback").read_bytes() == (tmp_path / "plain").read_bytes()


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
