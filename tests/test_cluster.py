"""Runs that survive a cluster (real processes, gloo on the CPU): a rank SIGKILLed in stage 2, while scoring
or while building the cache is restarted by torchrun --max_restarts 1 and the run ends as an uninterrupted
one would; a rank that stops answering ends the run within --dist_timeout with one line; two torchrun
agents with c10d rendezvous on 127.0.0.1 (two "nodes") give the one-agent results, and folders the ranks
do not share are refused in one line.

Run as a script (torchrun's worker) this file injects the fault of $CLUSTER_FAULT into the first attempt,
then runs the script it is given: RANK:module:attribute:N:kill|stop acts at the N-th call of attribute."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

if __name__ == "__main__":   # torchrun's worker: inject the fault, run the script
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import importlib
    import runpy
    spec = os.environ.get("CLUSTER_FAULT")
    if spec and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
        rank, module, attr, n, action = spec.split(":")
        if os.environ.get("RANK") == rank:
            owner = importlib.import_module(module)
            *path, name = attr.split(".")
            for part in path:
                owner = getattr(owner, part)
            original, calls = getattr(owner, name), [0]

            def faulty(*a, **k):
                calls[0] += 1
                if calls[0] == int(n):
                    print(f"fault: {action} rank {rank} at {attr} call {n} t={time.time():.3f}", file=sys.stderr,
                          flush=True)
                    os.kill(os.getpid(), signal.SIGKILL if action == "kill" else signal.SIGSTOP)
                return original(*a, **k)
            setattr(owner, name, faulty)
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
    sys.exit(0)

import pytest
import torch

import fixtures as fx

HERE = os.path.abspath(__file__)
D, S = "DFND_DeiT-train.py", "select_data.py"
EPOCHS = 3


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("cluster")
    fx.write_pool(base / "pool", 32, size=32)
    fx.write_cifar(base / "cifar", n_train=2, n_test=16)
    fx.write_teacher(base / "teacher.pth")
    return base


def run_flags(w, run, script=D, out=None, sel=None):
    """A short run: 32 pool images scored in 4 chunks (each rank 4 images of each), 16 selected, 3 epochs of
    2 steps at batch 8."""
    flags = ["--data_imagenet", w / "pool", "--teacher", fx.TEACHER, "--teacher_dir", w / "teacher.pth",
             "--num_select", 16, "--selected_file", sel or run / "sel", "--attnprobe_sel", "--workers", 0,
             "--device", "cpu", "--chunk_size", 8, "--no_report"]
    if script == D:
        flags += ["--data_cifar", w / "cifar", "--output_dir", out or run / "out", "--epochs", EPOCHS,
                  "--batch_size", 8, "--attnprobe_dist"]
    return [fx.script_path(script), *map(str, flags)]


def env(fault=None):
    return {**os.environ, **fx.CHILD_ENV, **({"CLUSTER_FAULT": fault} if fault else {})}


def torchrun(argv, *launch, fault=None, timeout=300):
    """One torchrun agent (--standalone, 2 workers unless `launch` says otherwise) -> CompletedProcess."""
    launch = launch or ("--standalone", "--nproc_per_node", "2")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", *launch, HERE, *argv], cwd=fx.ROOT,
                          capture_output=True, text=True, timeout=timeout, env=env(fault))


def two_agents(argv_of_node, timeout=300):
    """Two torchrun agents of one worker each, meeting by c10d rendezvous on 127.0.0.1 as two nodes would;
    argv_of_node(node) -> that node's command line. -> [(exit code, stdout, stderr)] per agent."""
    endpoint = f"127.0.0.1:{fx.free_port()}"
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node",
                               "1", "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint, "--rdzv_id", "cluster-test",
                               "--max_restarts", "0", HERE, *argv_of_node(node)], cwd=fx.ROOT, env=env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for node in (0, 1)]
    try:
        outs = [p.communicate(timeout=timeout) for p in procs]
        return [(p.returncode, *o) for p, o in zip(procs, outs)]
    finally:
        fx.stop_processes(procs)


def ours(err):
    """Our one-line endings in a stderr (progress bars clear their line first)."""
    return [line.strip() for line in err.replace("\r", "\n").splitlines() if line.strip().startswith(("error:",
                                                                                                        "interrupted:"))]


def results(run, out=None):
    """What a run leaves that must not depend on how it was run: the log lines (times aside), the selection,
    the scores, the student."""
    out = out or run / "out"
    log = [{k: v for k, v in json.loads(line).items() if not k.endswith(("seconds", "img_per_s"))}
           for line in open(out / "log.txt")]
    scores = {name: torch.load(run / "sel" / name, weights_only=True) for name in sorted(os.listdir(run / "sel"))
              if name.endswith(".pth") and name.startswith(("value_", "pred_"))}
    student = torch.load(out / "student" / "final.pth", weights_only=True)["model"]
    return log, (run / "sel" / "selected.txt").read_text(), scores, student


def assert_same(got, ref):
    (log, selected, scores, student), (log0, selected0, scores0, student0) = got, ref
    assert [r["epoch"] for r in log] == list(range(EPOCHS))
    for a, b in zip(log, log0):
        assert a.keys() == b.keys()
        for key in b:
            assert a[key] == pytest.approx(b[key], abs=1e-6), (a["epoch"], key)
    assert selected == selected0
    assert scores.keys() == scores0.keys() and len(scores) >= 3
    assert all(torch.equal(scores[k], scores0[k]) for k in scores0)
    assert all(torch.allclose(student[k], student0[k], atol=1e-6) for k in student0)


@pytest.fixture(scope="module")
def reference(world):
    """The uninterrupted run: one agent, --standalone, 2 workers."""
    run = world / "reference"
    proc = torchrun(run_flags(world, run))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert ours(proc.stderr) == []
    return results(run)


# (fault, what the survivor's line names, what the restarted group prints)
KILLS = {
    # rank 0 may still be drawing epoch 0's curves (after the commit) when rank 1 dies in epoch 1
    "distill": ("1:distill:distill_step:3:kill", ("error: rank 0 lost rank 1 during distillation epoch 1 step 0 (",
                                                  "error: rank 0 lost rank 1 during drawing curves.png of epoch 0 ("),
                "after epoch 0"),
    "scoring": ("1:scoring:score_images:2:kill", "error: rank 0 lost rank 1 during scoring chunk 2 of 4 (",
                "resuming scoring: 1 of 4 chunks already done"),
    "cache": ("0:pool:_ChunkBuilder.run:1:kill", "error: rank 1 lost rank 0 during building the pool cache (rank 0) (",
              "cache 32px"),
}


@pytest.mark.parametrize("where", list(KILLS))
def test_a_rank_sigkilled_is_restarted_by_torchrun_and_ends_as_the_uninterrupted_run(where, world, reference):
    """torchrun --max_restarts 1, one worker SIGKILLed mid-epoch, mid-scoring or (rank 0, the builder)
    mid-cache-build: the survivor ends with one line naming the lost rank and the restart, whether its own
    collective failed or the agent's SIGTERM came first; the restarted group forms (no stall on the dead
    group's addresses), resumes and ends with the uninterrupted run's log, selection, scores and student."""
    fault, line, resumed = KILLS[where]
    run = world / f"killed_{where}"
    t0 = time.time()
    proc = torchrun(run_flags(world, run), "--standalone", "--nproc_per_node", "2", "--max_restarts", "1",
                    fault=fault, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"fault: kill rank {fault[0]}" in proc.stderr
    assert len(ours(proc.stderr)) == 1 and ours(proc.stderr)[0].startswith(line), proc.stderr[-3000:]
    assert ours(proc.stderr)[0].endswith("torchrun restarts the group (1 restart(s) left), which resumes from "
                                         + ("the last finished epoch (student/last.pth)" if where == "distill" else
                                            "the last scored chunk" if where == "scoring" else
                                            "the cache chunks already decoded"))
    # the workers' own tracebacks are gone (torchrun's agent logs its restart in its own lines)
    assert "Traceback" not in proc.stderr and "[rank0]:" not in proc.stderr and "[rank1]:" not in proc.stderr
    second = proc.stdout.split("git ")[-1] + proc.stderr.split("fault: ")[-1]
    assert resumed in second, (proc.stdout[-2000:], proc.stderr[-2000:])
    assert_same(results(run), reference)
    print(f"{where}: killed and restarted run took {time.time() - t0:.1f} s")


def test_a_hung_rank_ends_the_run_within_dist_timeout(world, tmp_path):
    """Rank 1 stops (SIGSTOP: alive, silent) at the first step of epoch 1: rank 0 ends with one line naming
    rank 1 and the step within --dist_timeout plus the heartbeat check, exit 1; epoch 0's files are whole."""
    timeout = 10
    port = fx.free_port()
    procs, files = [], []
    run = tmp_path / "hung"
    argv = run_flags(world, run) + ["--dist_timeout", str(timeout)]
    for rank in range(2):
        e = {**env("1:distill:distill_step:3:stop"), **fx.rank_env(rank, 2, port)}
        files.append(open(tmp_path / f"err{rank}.txt", "w+"))
        procs.append(subprocess.Popen([sys.executable, HERE, *argv], cwd=fx.ROOT, env=e, stdout=subprocess.DEVNULL,
                                      stderr=files[-1]))
    try:
        fx.wait_for(lambda: "fault: stop" in (tmp_path / "err1.txt").read_text(), timeout=180, interval=0.05,
                    proc=procs[0])
        stopped = float((tmp_path / "err1.txt").read_text().split("t=")[-1].split()[0])
        code = procs[0].wait(timeout=timeout + 60)
        waited = time.time() - stopped
    finally:
        fx.stop_processes(procs, files)
    err = (tmp_path / "err0.txt").read_text()
    print(f"hang -> error line: {waited:.1f} s (--dist_timeout {timeout})")
    assert code == 1 and "Traceback" not in err, err[-3000:]
    assert ours(err) == [f"error: rank 0: rank 1 stopped answering during distillation epoch 1 step 0 (no reply "
                         f"within --dist_timeout {timeout} s); run the same command again to resume from the last "
                         "finished epoch (student/last.pth)"], err[-3000:]
    assert timeout <= waited <= timeout + 15
    last = torch.load(run / "out" / "student" / "last.pth", weights_only=True)
    assert last["epoch"] == 0
    assert [json.loads(line)["epoch"] for line in open(run / "out" / "log.txt")] == [0]
    assert not [n for n in os.listdir(run / "out" / "student") if n.startswith(".tmp")]


def test_two_nodes_by_c10d_rendezvous_give_the_one_agent_results(world, reference):
    """Two agents (one worker each) on 127.0.0.1 with c10d rendezvous, sharing the folders: the scores, the
    selection and the distillation equal the --standalone --nproc_per_node 2 run's."""
    run = world / "two_nodes"
    ends = two_agents(lambda node: run_flags(world, run))
    assert [code for code, _, _ in ends] == [0, 0], [err[-3000:] for _, _, err in ends]
    assert all(ours(err) == [] for _, _, err in ends)
    assert_same(results(run), reference)


@pytest.mark.parametrize("script", [D, S])
def test_a_folder_each_node_has_its_own_is_refused_in_one_line(script, world, tmp_path):
    """The same path on two nodes' own disks (here: another folder per agent) cannot be resumed from by
    the other node: refused on every rank before any work, one line from rank 0 saying what to set."""
    flag = "--output_dir" if script == D else "--selected_file"

    def argv(node):
        local = tmp_path / f"node{node}"
        return run_flags(world, tmp_path, script, out=local / "out", sel=tmp_path / "sel" if script == D else local)
    ends = two_agents(argv)
    lines = [line for _, _, err in ends for line in ours(err)]
    assert [code for code, _, _ in ends] == [1, 1], [err[-3000:] for _, _, err in ends]
    assert len(lines) == 1 and lines[0].startswith(f"error: {flag} {tmp_path}/node"), lines
    assert lines[0].endswith("is not shared by the ranks: rank 1 (on " + socket.gethostname() + ") does not see "
                             "rank 0's files there (a node-local disk?); every rank reads them to resume, so put it "
                             "on a file system every node mounts at the same path")
    assert not list(tmp_path.rglob("value_out.pth")) and not list(tmp_path.rglob("log.txt"))
