from llmops_jupyter.stages.data.format import load_dataset


def test_tiny_dataset_fixture(registry, tiny_dataset):
    ds = load_dataset(tiny_dataset.hash, registry)
    assert len(ds.train) == 36 and len(ds.eval) == 12
    ex = ds.train[0]
    assert ex["text"] == ex["prompt"] + ex["completion"]
    assert ex["prompt"].endswith("<|im_start|>assistant\n")
    assert load_dataset("data@latest", registry).version == ds.version


def test_run_logged_stops_a_child_past_its_budget_and_says_where_it_was(tmp_path):
    """The slow tests' budget helper: output reaches the log as it comes, and past the budget the child's whole
    process group (here a grandchild too) is stopped and the error shows its last lines."""
    import sys
    from pathlib import Path

    import pytest

    from llmops_jupyter.testing import run_logged, wait_until

    pid_file = tmp_path / "grandchild.pid"
    code = ("import subprocess, sys, time\n"
            "g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
            f"open({str(pid_file)!r}, 'w').write(str(g.pid))\n"
            "for i in range(3): print(f'step {i + 1}/9', flush=True)\n"
            "time.sleep(600)\n")
    with pytest.raises(TimeoutError) as info:
        run_logged([sys.executable, "-c", code], 3, tmp_path / "child.log", tail_lines=2)
    msg = str(info.value)
    assert "outlived its 3 s budget" in msg and msg.splitlines()[-2:] == ["step 2/9", "step 3/9"]
    stat = Path(f"/proc/{int(pid_file.read_text())}/stat")

    def stopped() -> bool:  # gone, or a zombie until init reaps it
        try:
            return stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"
        except FileNotFoundError:
            return True

    # the signal was sent before the raise; delivery may lag under load
    wait_until(stopped, 30, what="the timed-out child's grandchild to be stopped")

    status, out = run_logged([sys.executable, "-c", "print('done')"], 60, tmp_path / "ok.log")
    assert (status, out) == (0, "done\n")
