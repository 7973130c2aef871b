"""The graphed step's DDP parts that run without a GPU: its collectives (on gloo) and its watchdog's
thread (with a stand-in CUDA event; tests/test_gpu.py stalls a real rank)."""

import subprocess
import sys
import textwrap

import torch
import torch.multiprocessing as mp


def test_graphed_collectives_average_gradients_and_broadcast_buffers_as_ddp(tmp_path):
    """average_gradients and broadcast_buffers (DDP's work inside a graphed step), on 2 gloo processes."""
    from _collectives_worker import run
    from _distributed import free_port

    mp.spawn(run, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(2)]
    conv = torch.arange(120.0).reshape(2, 3, 4, 5) * 1.5  # the mean of 1x and 2x
    for result in ranks:
        torch.testing.assert_close(result["plain"], torch.full((2, 3), 1.5), rtol=0, atol=0)
        torch.testing.assert_close(result["conv"], conv, rtol=0, atol=0)
        assert result["conv_channels_last"] and result["unused"] is None
        assert torch.equal(result["running"], torch.full((3,), 10.0)) and result["tracked"].item() == 100


WATCHDOG = textwrap.dedent(
    """
    import sys, time
    import torch
    from distill.graphed_step import ReplayWatchdog

    class Event:  # a CUDA event's record/query, finished when Event.done
        done = False
        def record(self): pass
        def query(self): return Event.done

    torch.cuda.Event, torch.cuda.set_device = Event, lambda device: None
    watchdog = ReplayWatchdog(0.5, lambda step: f"step {step} never finished", torch.device("cpu"))
    watchdog.replayed(6)
    watchdog.replayed(7)
    if sys.argv[1] == "finished":
        Event.done = True
        time.sleep(2)
        watchdog.close()
        print("closed")
    else:
        time.sleep(60)
    """
)


def test_the_replay_watchdog_ends_the_process_when_a_replay_never_finishes():
    run = subprocess.run(
        [sys.executable, "-c", WATCHDOG, "stuck"], capture_output=True, text=True, timeout=30
    )
    assert run.returncode == 1 and "step 6 never finished" in run.stderr, run.stderr


def test_the_replay_watchdog_lets_finished_replays_be():
    run = subprocess.run(
        [sys.executable, "-c", WATCHDOG, "finished"], capture_output=True, text=True, timeout=30
    )
    assert run.returncode == 0 and run.stdout.strip() == "closed", run.stderr
