"""``resume: auto`` picks the newest *complete* resumable checkpoint: a directory
without the completeness marker (a save interrupted before its last write), a
``.tmp`` directory and stray names are never picked; pruning keeps the newest K."""

from __future__ import annotations

from asyncrl.learner.state import MARKER, Checkpointer, complete_checkpoints, latest_checkpoint


def make(root, name: str, complete: bool = True):
    d = root / name
    (d / "dcp").mkdir(parents=True)
    (d / "dcp" / "__0_0.distcp").write_bytes(b"shard")
    if complete:
        (d / MARKER).write_text("ok\n")
    return d


def test_newest_complete_is_picked(tmp_path):
    make(tmp_path, "step_2")
    make(tmp_path, "step_10")
    make(tmp_path, "step_9")
    assert latest_checkpoint(tmp_path) == tmp_path / "step_10"  # numeric, not lexicographic


def test_missing_marker_is_never_picked(tmp_path):
    make(tmp_path, "step_4")
    make(tmp_path, "step_6", complete=False)  # shards written, killed before the marker
    make(tmp_path, "step_8.tmp")  # marker written, killed before the rename
    (tmp_path / "step_7").write_text("a file, not a checkpoint")
    make(tmp_path, "notes")
    assert latest_checkpoint(tmp_path) == tmp_path / "step_4"
    assert [s for s, _ in complete_checkpoints(tmp_path)] == [4]


def test_none_when_nothing_complete(tmp_path):
    assert latest_checkpoint(tmp_path / "absent") is None
    make(tmp_path, "step_3", complete=False)
    assert latest_checkpoint(tmp_path) is None


def test_prune_keeps_last_k_and_drops_interrupted(tmp_path):
    ck = Checkpointer(tmp_path, keep=2)
    root = ck.root
    for s in (1, 2, 3):
        make(root, f"step_{s}")
    make(root, "step_4.tmp", complete=False)
    ck._prune()
    assert [s for s, _ in complete_checkpoints(root)] == [2, 3]
    assert not (root / "step_4.tmp").exists()
