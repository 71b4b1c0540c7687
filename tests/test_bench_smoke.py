"""The benchmark harness runs every case's code paths on tiny sizes, so it cannot rot."""
from bench.__main__ import cases, main


def test_every_case_runs_tiny(capsys):
    import torch

    threads = torch.get_num_threads()
    assert cases(), "no benchmark cases found"
    assert main(["--tiny"]) == 0
    assert torch.get_num_threads() == threads  # no case leaves its thread count behind
    out = capsys.readouterr().out
    assert out.count("### ") >= len(cases())
    assert "| --- |" not in out and "|---|" in out
