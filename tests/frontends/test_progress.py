"""A stage's phases show one progress bar after the other: in a terminal (no widgets) they never overwrite."""

from __future__ import annotations


def test_sequential_phases_do_not_stack_bars(capsys):
    from llmops_jupyter.core.runner import Event, EventType
    from llmops_jupyter.frontends.progress import ProgressView

    view = ProgressView(front_end="magic")  # %llmops in a terminal IPython: tqdm.auto falls back to text bars
    for desc, total in (("cleaning", 30), ("templating", 25)):
        for i in range(total):
            view(Event(EventType.PROGRESS, "data-x", "data", {"done": i + 1, "total": total, "desc": desc}))
    view(Event(EventType.FINISHED, "data-x", "data", {}))
    err = capsys.readouterr().err
    assert "\x1b[A" not in err  # no cursor-up: bars are not stacked on top of each other
    assert "cleaning: 100%" in err and "templating: 100%" in err
    assert err.index("cleaning: 100%") < err.index("templating")
