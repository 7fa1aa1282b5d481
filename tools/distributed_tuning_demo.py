"""Distributed hyper-parameter search on localhost: one keras-tuner chief and N workers.

keras-tuner distributes a search by running the same tuner in several processes that differ only
in their environment: ``KERASTUNER_TUNER_ID`` (``chief`` for the process that owns the oracle,
any other id for a worker), ``KERASTUNER_ORACLE_IP`` and ``KERASTUNER_ORACLE_PORT`` (where the
chief's gRPC oracle listens). Workers ask the chief for trials, train them and report back. This
script starts a chief and ``--workers`` workers of :class:`tfqkd.tuning.DistillationTuner` (the
``recipes/sweep.py --mode=search`` tuner, smoke preset: tiny models on ``digits``) on a free
local port, waits for them under ``--timeout`` seconds (killing every process it started on
failure), and checks that every trial completed.

Example::

    python tools/distributed_tuning_demo.py --output_dir=/tmp/dist_demo --max_trials=4

The LAST line of output is one JSON object: trials by status, trials per worker, wall time.

To run the same thing by hand (or across machines), start in three shells::

    KERASTUNER_TUNER_ID=chief   KERASTUNER_ORACLE_IP=127.0.0.1 KERASTUNER_ORACLE_PORT=8000 \\
        python recipes/sweep.py --mode=search --preset=smoke --output_dir=/tmp/s
    KERASTUNER_TUNER_ID=tuner0  KERASTUNER_ORACLE_IP=127.0.0.1 KERASTUNER_ORACLE_PORT=8000 \\
        python recipes/sweep.py --mode=search --preset=smoke --output_dir=/tmp/s
    KERASTUNER_TUNER_ID=tuner1  ... (same)
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("output_dir", "runs/distributed_tuning_demo", "Shared output directory.")
flags.DEFINE_integer("workers", 2, "Number of worker processes.")
flags.DEFINE_integer("max_trials", 4, "Trials of the random search.")
flags.DEFINE_enum("oracle", "random", ["random", "bayesian", "hyperband"], "Search algorithm.")
flags.DEFINE_string("teachers", "1,2", "Teacher widths or saved teacher paths to search over.")
flags.DEFINE_string("temperatures", "1,2,4,8", "Temperatures to search over.")
flags.DEFINE_integer("epochs", 2, "Epochs per trial.")
flags.DEFINE_integer("timeout", 300, "Seconds before every process is killed and the demo fails.")
flags.DEFINE_integer("port", 0, "Oracle port (0: pick a free one).")
flags.DEFINE_enum("role", "launcher", ["launcher", "chief", "worker"],
                  "Internal: the launcher starts one chief and --workers workers of this script.")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cfg():
    from recipes import sweep

    return sweep.make_config(
        "smoke", mode="search", oracle=FLAGS.oracle, max_trials=FLAGS.max_trials,
        output_dir=FLAGS.output_dir, teachers=FLAGS.teachers, temperatures=FLAGS.temperatures,
        schedules="constant,linear", epochs=FLAGS.epochs, baseline=False,
    )


def _wait_for(paths, timeout: float) -> None:
    deadline = time.time() + timeout
    while not all(os.path.exists(p) for p in paths):
        if time.time() > deadline:
            raise TimeoutError(f"workers not ready after {timeout:.0f} s: {paths}")
        time.sleep(0.2)


def _worker() -> None:
    from recipes import common, sweep

    cfg = _cfg()
    tuner = sweep.build_tuner(cfg)
    data = sweep.load_trial_data(cfg)
    # Prepare the teachers (and TensorFlow) before taking trials, then start together: otherwise
    # the first worker to finish importing would take every trial of a short demo.
    for key in tuner.hypermodel.teachers:
        tuner.teachers.get(key, data)
    ready = os.path.join(sweep.output_root(cfg), "ready")
    os.makedirs(ready, exist_ok=True)
    with open(os.path.join(ready, tuner.tuner_id), "w") as f:
        f.write(str(os.getpid()))
    _wait_for([os.path.join(ready, f"tuner{i}") for i in range(FLAGS.workers)], FLAGS.timeout)
    tuner.search(data, verbose=0)
    common.log(f"worker {tuner.tuner_id} ran {tuner.run_trial_calls} trial(s)")


def _chief() -> None:
    from recipes import sweep

    cfg = _cfg()
    tuner = sweep.build_tuner(cfg)
    tuner.search()  # serves the oracle until every trial has ended


def _summary(project_dir: str) -> dict:
    trials = {}
    for name in sorted(os.listdir(project_dir)):
        if not name.startswith("trial_"):
            continue
        with open(os.path.join(project_dir, name, "trial.json")) as f:
            trial = json.load(f)
        record_path = os.path.join(project_dir, name, "metrics.json")
        record = {}
        if os.path.exists(record_path):
            with open(record_path) as f:
                record = json.load(f)
        trials[trial["trial_id"]] = {"status": trial["status"], "score": trial.get("score"),
                                     "tuner_id": record.get("tuner_id")}
    by_status, by_worker = {}, {}
    for t in trials.values():
        by_status[t["status"]] = by_status.get(t["status"], 0) + 1
        if t["tuner_id"]:
            by_worker[t["tuner_id"]] = by_worker.get(t["tuner_id"], 0) + 1
    return {"trials": len(trials), "by_status": by_status, "trials_per_worker": by_worker}


def _launch() -> int:
    import shutil

    root = os.path.abspath(FLAGS.output_dir)
    if os.path.isdir(root):
        shutil.rmtree(root)
    os.makedirs(os.path.join(root, "logs"), exist_ok=True)
    port = FLAGS.port or _free_port()
    argv = [sys.executable, os.path.abspath(__file__)] + [
        a for a in sys.argv[1:] if not a.startswith("--role")]
    procs = {}
    start = time.time()
    for tuner_id in ["chief"] + [f"tuner{i}" for i in range(FLAGS.workers)]:
        env = dict(os.environ, KERASTUNER_TUNER_ID=tuner_id, KERASTUNER_ORACLE_IP="127.0.0.1",
                   KERASTUNER_ORACLE_PORT=str(port), PYTHONUNBUFFERED="1")
        role = "chief" if tuner_id == "chief" else "worker"
        log = open(os.path.join(root, "logs", f"{tuner_id}.log"), "w")
        procs[tuner_id] = (subprocess.Popen(
            argv + [f"--role={role}", f"--port={port}", f"--output_dir={root}"], env=env,
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True), log)
    with open(os.path.join(root, "pids.json"), "w") as f:  # lets a supervisor clean up after us
        json.dump({k: p.pid for k, (p, _) in procs.items()}, f)
    print(f"chief + {FLAGS.workers} workers on 127.0.0.1:{port}, logs in {root}/logs", flush=True)
    failed = None
    deadline = start + FLAGS.timeout
    while True:
        codes = {k: p.poll() for k, (p, _) in procs.items()}
        bad = {k: c for k, c in codes.items() if c not in (None, 0)}
        if bad:
            failed = f"process(es) exited with errors: {bad}"
            break
        if all(c == 0 for c in codes.values()):
            break
        if time.time() > deadline:
            failed = f"timeout after {FLAGS.timeout} s; still running: " + ", ".join(
                k for k, c in codes.items() if c is None)
            break
        time.sleep(0.5)
    for name, (proc, log) in procs.items():
        if proc.poll() is None:
            # Only the processes this launcher started (each in its own session).
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
    if failed:
        for name in procs:
            with open(os.path.join(root, "logs", f"{name}.log")) as f:
                tail = f.read().splitlines()[-15:]
            print(f"--- {name} (last lines)\n" + "\n".join(tail), flush=True)
    project = os.path.join(root, "tuner", f"search_{FLAGS.oracle}")
    summary = _summary(project) if os.path.isdir(project) else {"trials": 0}
    summary.update({"ok": failed is None, "error": failed, "port": port,
                    "workers": FLAGS.workers, "wall_time_s": round(time.time() - start, 1)})
    print(json.dumps(summary), flush=True)
    return 0 if failed is None else 1


def main(argv):
    del argv
    if FLAGS.role == "chief":
        _chief()
    elif FLAGS.role == "worker":
        _worker()
    else:
        sys.exit(_launch())


if __name__ == "__main__":
    app.run(main)
