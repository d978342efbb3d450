"""How much the GPU watch costs the supervisor.

    cd /work/main && PYTHONPATH=. python bench/bench_gpu_poll.py [--seconds 20] [--gpus 1]

Prints:
1. one poll of the fake backend: read every GPU + run the policies (inline mode), and
   what the supervisor's loop pays per poll() in threaded mode (take the snapshot only);
2. the real NvmlBackend's code path as far as this machine goes: nvmlInit failing with
   "library not found" (first and later attempts), plus NvmlBackend.read()'s decoding
   against an in-memory stand-in for pynvml (no driver here: the driver's own time is
   not in this number);
3. CPU use of a threaded watcher polled at 1 s for --seconds: process CPU time / wall
   time, in % of one core (target: under 1%);
4. the supervisor's own CPU during a real `trainsup run` (fake rank under accelerate
   launch, loop tick 1 s) with [gpu] off and with the fake GPU watcher at a 1 s poll,
   measured in the same run of this script (--supervise-s each; 0 skips it).
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from supervisor.watch.fake_gpu import FakeGpuBackend, FakeScript  # noqa: E402
from supervisor.watch.gpu import GpuWatcher  # noqa: E402
from supervisor.watch.nvml import GpuUnavailable, NvmlBackend  # noqa: E402
from supervisor.watch.thermal import GpuConfig  # noqa: E402

GIB = 2**30


def script(gpus: int) -> FakeScript:
    # A 10-minute ramp with a point every 5 s per GPU: a realistic script size.
    points = [
        {"t_s": t, "gpu": g, "temp_c": 50 + (t % 300) / 10, "vram_used_bytes": GIB + t * 1000, "vram_total_bytes": 4 * GIB,
         "power_w": 60.0, "power_limit_w": 80.0, "throttle": ["sw_power_cap"] if t % 20 else []}
        for g in range(gpus) for t in range(0, 600, 5)
    ]
    return FakeScript.from_obj(points)


def per_call_us(fn, n: int) -> tuple[float, float]:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6, max(times) * 1e6


def bench_fake_poll(gpus: int) -> None:
    s = script(gpus)
    clock = SimpleNamespace(t=0.0)
    backend = FakeGpuBackend(s, start_s=0.0, clock=lambda: clock.t)
    w = GpuWatcher(GpuConfig(poll_interval_s=0.1), backend, threaded=False, clock=lambda: clock.t)

    def one():
        clock.t += 0.5  # every poll samples (interval 0.1 s) and moves through the script
        w.poll(clock.t)

    w.poll(0.0)
    med, worst = per_call_us(one, 1000)
    print(f"fake backend, inline read of {gpus} GPU(s) + policies: median {med:.1f} us, max {worst:.1f} us per poll")

    tw = GpuWatcher(GpuConfig(poll_interval_s=1.0), FakeGpuBackend(s, start_s=time.monotonic()), threaded=True)
    tw.start()
    while tw.status()["available"] is not True:
        time.sleep(0.005)
    med, worst = per_call_us(lambda: tw.poll(time.monotonic()), 1000)
    print(f"fake backend, threaded poll() in the supervisor loop (drain only): median {med:.1f} us, max {worst:.1f} us")
    tw.close()


def bench_nvml_path() -> None:
    first = time.perf_counter()
    b = NvmlBackend()
    try:
        b.open()
        print("NVML opened: this machine has a driver; the 'not found' path was not measured")
        b.close()
        return
    except GpuUnavailable as e:
        reason = str(e)
    first_us = (time.perf_counter() - first) * 1e6

    def attempt():
        try:
            NvmlBackend().open()
        except GpuUnavailable:
            pass

    med, worst = per_call_us(attempt, 200)
    print(f"real NvmlBackend.open() up to {reason!r}: first {first_us:.0f} us (imports pynvml), "
          f"then median {med:.1f} us, max {worst:.1f} us")

    stub = SimpleNamespace(
        NVMLError=RuntimeError, NVMLLibraryMismatchError=LookupError,
        nvmlInit=lambda: None, nvmlShutdown=lambda: None, nvmlDeviceGetCount=lambda: 1,
        nvmlDeviceGetHandleByIndex=lambda i: i, nvmlDeviceGetUUID=lambda h: "GPU-0",
        nvmlDeviceGetName=lambda h: "stub", nvmlDeviceGetTemperatureV=lambda h, s: 70,
        nvmlDeviceGetMemoryInfo=lambda h: SimpleNamespace(total=4 * GIB, used=GIB, free=3 * GIB),
        nvmlDeviceGetPowerUsage=lambda h: 50000, nvmlDeviceGetEnforcedPowerLimit=lambda h: 80000,
        nvmlDeviceGetCurrentClocksEventReasons=lambda h: 0x44,
        nvmlDeviceGetComputeRunningProcesses=lambda h: [SimpleNamespace(pid=1, usedGpuMemory=GIB)],
    )
    nb = NvmlBackend(stub)
    nb.open()
    med, worst = per_call_us(lambda: nb.read(0), 2000)
    print(f"NvmlBackend.read() decoding (8 NVML calls, stand-in module, driver time excluded): median {med:.1f} us")


def bench_cpu(seconds: float, gpus: int) -> None:
    for label, backend in (
        ("fake", FakeGpuBackend(script(gpus), start_s=time.monotonic())),
        ("nvml (unavailable here)", NvmlBackend()),
    ):
        w = GpuWatcher(GpuConfig(poll_interval_s=1.0), backend, threaded=True)
        cpu0, wall0 = time.process_time(), time.monotonic()
        w.start()
        polls = 0
        next_t = wall0
        while time.monotonic() - wall0 < seconds:
            w.poll(time.monotonic())
            w.status()
            polls += 1
            next_t += 1.0
            time.sleep(max(0.0, next_t - time.monotonic()))
        cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
        w.close()
        print(f"CPU, watcher '{label}' at 1 s poll for {wall:.1f} s ({polls} polls, {gpus} GPU(s)): "
              f"{cpu * 1000:.1f} ms CPU = {100 * cpu / wall:.3f}% of one core")


def bench_supervisor_cpu(seconds: float) -> None:
    import psutil

    repo = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(repo / "tests"))
    from supervisor_helpers import CLI, env, write_job

    results = {}
    for label, gpu in (("[gpu] enabled = false", {"enabled": False}),
                       ("fake GPU watcher, poll_interval_s = 1", {"backend": "fake", "fake_script": "gpu.json",
                                                                  "poll_interval_s": 1.0})):
        with tempfile.TemporaryDirectory() as d:
            tmp = Path(d)
            (tmp / "gpu.json").write_text(json.dumps([
                {"t_s": t, "temp_c": 60 + t % 20, "vram_used_bytes": GIB, "vram_total_bytes": 4 * GIB,
                 "power_w": 50.0, "power_limit_w": 80.0} for t in range(0, 600, 5)]))
            steps = int((seconds + 30) / 0.05)
            job = write_job(tmp, ["--steps", str(steps), "--step-time", "0.05", "--heartbeat-s", "1.0"],
                            watch={"poll_interval_s": 1.0}, gpu=gpu)
            proc = subprocess.Popen([*CLI, "run", str(job)], env=env(), stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL, cwd=repo)
            p = psutil.Process(proc.pid)
            time.sleep(4.0)  # past start-up (imports, launcher spawn)
            c0, t0 = sum(p.cpu_times()[:2]), time.monotonic()
            time.sleep(seconds)
            c1, t1 = sum(p.cpu_times()[:2]), time.monotonic()
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
            results[label] = 100 * (c1 - c0) / (t1 - t0)
            print(f"supervisor CPU during a real run, {label}: {results[label]:.3f}% of one core "
                  f"over {t1 - t0:.1f} s (target < 1%)")
    a, b = results.values()
    print(f"  the GPU watcher adds {b - a:+.3f} percentage points "
          f"(load average {__import__('os').getloadavg()[0]:.2f}: other work skews this)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--gpus", type=int, default=1)
    ap.add_argument("--supervise-s", type=float, default=20.0)
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)  # the "monitoring is off" warning would repeat per attempt
    bench_fake_poll(args.gpus)
    bench_nvml_path()
    bench_cpu(args.seconds, args.gpus)
    if args.supervise_s > 0:
        bench_supervisor_cpu(args.supervise_s)


if __name__ == "__main__":
    main()
