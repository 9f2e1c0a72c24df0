"""``dist-sparse slurm submit`` and the sbatch templates, against a real local Slurm.

Rendering tests need no cluster. Tests marked ``slurm`` use the session cluster of conftest.py (two
emulated nodes n1, n2 with 2 CPUs each on this host); the ones that train need Fashion-MNIST and
``launch/ddp.yaml``. Jobs inherit this process's environment (OMP_NUM_THREADS=1, the venv).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from dist_sparse.slurm import SubmitSpec, expand_sweep, main, render_script, split_values
from tests.conftest import ROOT, TINY, needs_fmnist, read_metrics

SMALL = ["data.train_subset=2048", "data.val_subset=512", "run.epochs=1", "logging.progress_bar=false",
         "logging.log_every_steps=1", "logging.plots=false"]
needs_ddp_yaml = pytest.mark.skipif(not os.path.isfile(os.path.join(ROOT, "launch", "ddp.yaml")),
                                    reason="launch/ddp.yaml missing")


@pytest.fixture
def slurm_cli(monkeypatch, capsys):
    """Run ``dist-sparse slurm ARGS`` in this process from directory ``cwd``; returns (status, stdout, stderr).

    Jobs it submits inherit this process's environment (plus ``env``): OMP_NUM_THREADS=1, the venv.
    """

    def call(args: list[str], cwd, env: dict | None = None):
        with monkeypatch.context() as m:
            m.chdir(cwd)
            m.setenv("OMP_NUM_THREADS", "1")
            m.setenv("PYTHONPATH", ROOT)
            for k, v in (env or {}).items():
                m.setenv(k, v)
            capsys.readouterr()
            rc = main(args)
            out = capsys.readouterr()
        return rc, out.out, out.err

    return call


def sbatch_lines(script: str) -> list[str]:
    """The active ``#SBATCH`` directives of a script, without comments."""
    return [re.sub(r"\s+#.*$", "", ln).strip() for ln in script.splitlines() if ln.startswith("#SBATCH ")]


def env_value(script: str, name: str) -> str:
    m = re.search(rf"^{name}=(.*?)(\s{{2,}}#.*)?$", script, re.M)
    assert m, name
    return m.group(1)


def submitted_id(result: tuple) -> str:
    rc, out, err = result
    assert rc == 0, out + err
    m = re.search(r"submitted (?:array )?job (\d+)", out)
    assert m, out
    return m.group(1)


# ------------------------------------------------------------------------------------------------
# Rendering and validation (no cluster)
# ------------------------------------------------------------------------------------------------


def test_split_values_and_expand_sweep():
    assert split_values("0.1, 0.05") == ["0.1", "0.05"]
    assert split_values("[0.5,0.75],[0.3],'a,b'") == ["[0.5,0.75]", "[0.3]", "'a,b'"]
    lines = expand_sweep(["optim.lr=0.1,0.05", "run.seed=0,1"], ["model.norm=gn"])
    assert lines == ["optim.lr=0.1 run.seed=0 model.norm=gn", "optim.lr=0.1 run.seed=1 model.norm=gn",
                     "optim.lr=0.05 run.seed=0 model.norm=gn", "optim.lr=0.05 run.seed=1 model.norm=gn"]
    assert expand_sweep([]) == []


@needs_ddp_yaml
def test_dry_run_single_node_fills_the_template(slurm_cli, tmp_path):
    rc, out, err = slurm_cli(["submit", "--config", TINY, "--procs-per-node", "2", "--gpus-per-node", "0",
                   "--partition", "cpu", "--time", "00:05:00", "--signal-seconds", "60",
                   "--log-dir", "joblogs", "--dry-run", "optim.lr=0.05", "run.output_dir=out"], cwd=tmp_path)
    assert rc == 0, err
    s = out
    assert sbatch_lines(s) == [
        "#SBATCH --job-name=tiny_resnet20_dense", "#SBATCH --nodes=1", "#SBATCH --ntasks-per-node=1",
        "#SBATCH --cpus-per-task=2", "#SBATCH --time=00:05:00", "#SBATCH --partition=cpu",
        f"#SBATCH --output={tmp_path}/joblogs/%x-%j.out", "#SBATCH --open-mode=append",
        "#SBATCH --signal=B:USR1@60", "#SBATCH --requeue"]
    assert "##SBATCH --gpus-per-node=8" in s and "##SBATCH --array" in s and "##SBATCH --account" in s
    assert env_value(s, "CONFIG") == TINY
    assert env_value(s, "REPO_DIR") == ROOT
    assert env_value(s, "PROCS_PER_NODE") == "2"
    assert env_value(s, "BACKEND") == "ddp"
    assert env_value(s, "OUTPUT_DIR") == f"{tmp_path}/out"  # relative paths: from where you submit
    assert env_value(s, "OVERRIDES") == f"(optim.lr=0.05 run.output_dir=out)"
    assert env_value(s, "VENV") in (sys.prefix, "''")
    assert "--num_machines 1 --machine_rank 0" in s
    assert "<-- Replace" not in "\n".join(ln for ln in s.splitlines() if not ln.startswith(("##", "# ")))
    assert subprocess.run(["bash", "-n"], input=s, text=True).returncode == 0
    assert not (tmp_path / "joblogs").exists()  # a dry run creates nothing


@needs_ddp_yaml
def test_dry_run_multinode_renders_per_node_launch(slurm_cli, tmp_path):
    rc, out, err = slurm_cli(["submit", "--config", TINY, "--nodes", "4", "--procs-per-node", "8", "--cpus-per-proc", "6",
                   "--account", "proj", "--dry-run", "run.num_processes=32"], cwd=tmp_path)
    assert rc == 0, err
    s = out
    lines = sbatch_lines(s)
    for want in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --cpus-per-task=48", "#SBATCH --account=proj", "#SBATCH --signal=B:USR1@300"):
        assert want in lines, (want, lines)
    assert "#SBATCH --time=24:00:00" in lines  # not given: the template's value stays
    # one srun task per node; every node passes its own rank and the shared rendezvous host/port
    assert re.search(r"^srun --nodes=\"\$SLURM_NNODES\" --ntasks-per-node=1 .*bash -c \"\$NODE_CMD\"", s, re.M)
    for flag in ('--num_machines "$SLURM_NNODES"', '--machine_rank "$SLURM_NODEID"', '--num_processes "$WORLD"',
                 '--main_process_ip "$MAIN_IP"', '--main_process_port "$MAIN_PORT"'):
        assert flag in s
    assert 'scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1' in s
    assert "MAIN_PORT=$(( 20000 + SLURM_JOB_ID % 20000 ))" in s
    assert subprocess.run(["bash", "-n"], input=s, text=True).returncode == 0


@needs_ddp_yaml
def test_dry_run_array_has_one_line_per_index(slurm_cli, tmp_path):
    sweep_file = tmp_path / "sweep.txt"
    sweep_file.write_text("# comment\nmodel.norm=gn\n\nmodel.norm=bn optim.nesterov=false\n")
    rc, out, err = slurm_cli(["submit", "--config", TINY, "--procs-per-node", "2", "--gpus-per-node", "0",
                   "--sweep", "optim.lr=0.1,0.05", "--sweep-file", str(sweep_file), "--dry-run"], cwd=tmp_path)
    assert rc == 0, err
    s = out
    assert "#SBATCH --array=0-3" in sbatch_lines(s)
    assert f"#SBATCH --output={tmp_path}/logs/%x-%A_%a.out" in sbatch_lines(s)
    block = s.split("<<'SWEEP' || true\n", 1)[1].split("\nSWEEP\n", 1)[0]
    assert block.splitlines() == ["optim.lr=0.1 model.norm=gn", "optim.lr=0.1 model.norm=bn optim.nesterov=false",
                                  "optim.lr=0.05 model.norm=gn", "optim.lr=0.05 model.norm=bn optim.nesterov=false"]


def test_render_keeps_template_shape_and_adds_missing_options():
    spec = SubmitSpec(config=TINY, procs_per_node=2, gpus_per_node=0, extra_sbatch=["--qos=high"],
                      sweep_lines=["optim.lr=0.1"], signal_seconds=0, job_name="j")
    s = render_script(spec)
    template = Path(ROOT, "slurm", "train.sbatch").read_text()
    assert len(s.splitlines()) == len(template.splitlines()) + 2  # + the qos line + the one sweep line
    lines = sbatch_lines(s)
    assert lines[-1] == "#SBATCH --qos=high" and "#SBATCH --array=0-0" in lines
    assert not any(ln.startswith("#SBATCH --signal") for ln in lines)  # 0: no preemption signal


@needs_ddp_yaml
def test_bad_config_is_one_line_and_exit_2(slurm_cli, tmp_path):
    rc, out, err = slurm_cli(["submit", "--config", TINY, "--dry-run", "optim.lr=-1"], cwd=tmp_path)
    assert rc == 2
    assert out == ""
    assert err.splitlines() == ["config error: optim.lr = -1.0 is not allowed; expected a number > 0"]
    rc, out, err = slurm_cli(["submit", "--config", TINY, "--procs-per-node", "2", "--dry-run", "--sweep", "optim.momentum=0.9,1.5"],
                  cwd=tmp_path)
    assert rc == 2 and len(err.splitlines()) == 1
    assert err.startswith("config error: optim.momentum = 1.5") and "sweep line 1: optim.momentum=1.5" in err
    rc, out, err = slurm_cli(["submit", "--config", TINY, "--dry-run", "--procs-per-node", "4"], cwd=tmp_path)
    assert rc == 2  # the config says run.num_processes: 2
    assert err.strip() == ("config error: run.num_processes = 2 is not allowed; expected 0 or 4 "
                                "(= --nodes 1 x --procs-per-node 4)")
    rc, out, err = slurm_cli(["submit", "--config", TINY, "--procs-per-node", "2", "--dry-run", "--backend", "nosuch"], cwd=tmp_path)
    assert rc == 2 and err.startswith("config error: --backend = 'nosuch' is not allowed; expected one of")
    assert "ddp" in err


@needs_ddp_yaml
def test_missing_sbatch_is_one_clear_line(slurm_cli, tmp_path):
    rc, out, err = slurm_cli(["submit", "--config", TINY, "--procs-per-node", "2"], cwd=tmp_path,
                             env={"PATH": str(tmp_path)})  # no sbatch on this PATH
    assert rc == 1
    assert err.splitlines() == ["error: sbatch not found on PATH: run this on a Slurm login node "
                                     "(or use --dry-run to see the script)"]


@needs_ddp_yaml
def test_entry_points_dist_sparse_cli_and_python_m(capsys, tmp_path, monkeypatch):
    from dist_sparse.cli import main as cli_main

    monkeypatch.chdir(tmp_path)
    assert cli_main(["slurm", "submit", "--config", TINY, "--procs-per-node", "2", "--dry-run"]) == 0
    assert capsys.readouterr().out.startswith("#!/bin/bash\n# dist_sparse on ONE node")
    p = subprocess.run([sys.executable, "-m", "dist_sparse.slurm", "submit", "--help"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "--procs-per-node" in p.stdout and "--sweep KEY=V1,V2" in p.stdout


def test_templates_have_blocks_and_placeholders():
    for name in ("train.sbatch", "train_multinode.sbatch"):
        text = Path(ROOT, "slurm", name).read_text()
        for block in ("SBATCH block", "environment block", "launch block"):
            assert f"# ================================ {block}" in text
        assert text.count("<-- Replace") >= 8
        assert "scontrol requeue" in text and "PREEMPTED" in text and "checkpoint.resume=auto" in text
        assert subprocess.run(["bash", "-n", str(Path(ROOT, "slurm", name))]).returncode == 0


# ------------------------------------------------------------------------------------------------
# Real local cluster
# ------------------------------------------------------------------------------------------------


@pytest.mark.slurm
def test_cluster_has_two_nodes(slurm_cluster, tmp_path):
    out = tmp_path / "nodes.out"
    jid = slurm_cluster.sbatch(["--nodes=2", "--ntasks-per-node=1", f"--output={out}", "--wrap",
                                "srun bash -c 'echo $SLURM_NODEID $SLURMD_NODENAME'"])
    [rec] = slurm_cluster.wait(jid, timeout=60)
    assert (rec["JobState"], rec["ExitCode"]) == ("COMPLETED", "0:0")
    assert sorted(out.read_text().splitlines()) == ["0 n1", "1 n2"]


@pytest.mark.slurm
@needs_ddp_yaml
def test_cluster_refusal_shows_sbatch_error(slurm_cli, slurm_cluster, tmp_path):
    rc, out, err = slurm_cli(["submit", "--config", TINY, "--procs-per-node", "2", "--gpus-per-node", "0",
                   "--partition", "nosuch"], cwd=tmp_path, env=slurm_cluster.client_env)
    assert rc == 1
    assert err.splitlines() == ["error: sbatch refused the job: sbatch: error: invalid partition specified: nosuch "
                                     "sbatch: error: Batch job submission failed: Invalid partition name specified"]


@pytest.mark.slurm
def test_job_with_bad_config_fails_with_one_line(slurm_cluster, tmp_path):
    # The config is checked again inside the job (it may differ on the cluster, or the script was
    # edited by hand): a bad value must end the job FAILED with the one-line error in its log.
    spec = SubmitSpec(config=TINY, overrides=["optim.lr=-1"], procs_per_node=2, gpus_per_node=0,
                      job_name="badcfg", output_dir=str(tmp_path / "runs"), log_dir=str(tmp_path / "logs"),
                      venv=sys.prefix)
    (tmp_path / "logs").mkdir()
    script = tmp_path / "bad.sbatch"
    script.write_text(render_script(spec))
    jid = slurm_cluster.sbatch([str(script)])
    [rec] = slurm_cluster.wait(jid, timeout=60)
    assert (rec["JobState"], rec["ExitCode"]) == ("FAILED", "2:0")
    log = (tmp_path / "logs" / f"badcfg-{jid}.out").read_text()
    errors = [ln for ln in log.splitlines() if "error" in ln.lower()]
    assert errors == ["config error: optim.lr = -1.0 is not allowed; expected a number > 0"], log
    assert not (tmp_path / "runs").exists()  # nothing was launched


@pytest.mark.slurm
@needs_fmnist
@needs_ddp_yaml
def test_submit_two_processes_completes(slurm_cli, slurm_cluster, tmp_path):
    rc, out, err = slurm_cli(["submit", "--config", TINY, "--procs-per-node", "2", "--gpus-per-node", "0",
                   "--time", "00:10:00", "--log-dir", str(tmp_path / "logs"), *SMALL,
                   f"run.output_dir={tmp_path / 'runs'}"], cwd=tmp_path, env=slurm_cluster.client_env)
    jid = submitted_id((rc, out, err))
    log_path = tmp_path / "logs" / f"tiny_resnet20_dense-{jid}.out"
    run_dir = tmp_path / "runs" / f"tiny_resnet20_dense-{jid}"
    assert f"log:      {log_path}" in out and f"run dir:  {run_dir}" in out
    assert (tmp_path / "logs" / f"tiny_resnet20_dense-{jid}.sbatch").is_file()  # the script that ran
    [rec] = slurm_cluster.wait(jid, timeout=240)
    log = log_path.read_text()
    assert (rec["JobState"], rec["ExitCode"]) == ("COMPLETED", "0:0"), log[-3000:]
    rows = read_metrics(str(run_dir))
    start = [r for r in rows if r["event"] == "start"]
    assert len(start) == 1 and start[0]["processes"] == 2
    steps = [r for r in rows if r["event"] == "train"]
    assert [r["step"] for r in steps] == list(range(1, 17))  # 2048 / 128 = 16 optimizer steps
    assert all(r["loss"] > 0 for r in steps)
    [epoch] = [r for r in rows if r["event"] == "epoch"]
    assert epoch["train_loss"] < steps[0]["loss"]  # it learned something in 16 steps
    assert 0.1 < epoch["val_acc"] <= 1.0
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert cfg["data"]["train_subset"] == 2048 and cfg["run"]["num_processes"] == 2
    assert cfg["run"]["name"] == f"tiny_resnet20_dense-{jid}"
    assert re.search(rf"^\[slurm\] [0-9:]{{8}} job {jid} \({jid}\) restart 0 on ", log, re.M), log[:2000]
    assert "training exited with status 0" in log


@pytest.mark.slurm
@needs_fmnist
@needs_ddp_yaml
def test_multinode_two_nodes_one_process_each(slurm_cli, slurm_cluster, tmp_path):
    rc, out, err = slurm_cli(["submit", "--config", TINY, "--nodes", "2", "--procs-per-node", "1", "--gpus-per-node", "0",
                   "--job-name", "mn", "--log-dir", str(tmp_path / "logs"), *SMALL, "run.max_steps=4",
                   f"run.output_dir={tmp_path / 'runs'}"], cwd=tmp_path, env=slurm_cluster.client_env)
    jid = submitted_id((rc, out, err))
    [rec] = slurm_cluster.wait(jid, timeout=240)
    log = (tmp_path / "logs" / f"mn-{jid}.out").read_text()
    assert (rec["JobState"], rec["ExitCode"]) == ("COMPLETED", "0:0"), log[-3000:]
    assert rec["NodeList"] == "n[1-2]"
    assert "2 nodes (n[1-2]) x 1 = 2 processes" in log and "main 127.0.0.1:" in log
    rows = read_metrics(str(tmp_path / "runs" / f"mn-{jid}"))
    assert [r["processes"] for r in rows if r["event"] == "start"] == [2]
    assert [r["steps"] for r in rows if r["event"] == "end"] == [4]


@pytest.mark.slurm
@needs_fmnist
@needs_ddp_yaml
def test_array_job_runs_each_override_line(slurm_cli, slurm_cluster, tmp_path):
    rc, out, err = slurm_cli(["submit", "--config", TINY, "--procs-per-node", "1", "--gpus-per-node", "0",
                   "--job-name", "sweep", "--sweep", "optim.lr=0.2,0.05", "--log-dir", str(tmp_path / "logs"),
                   *SMALL, "run.max_steps=2", "run.num_processes=0", f"run.output_dir={tmp_path / 'runs'}"],
                  cwd=tmp_path, env=slurm_cluster.client_env)
    jid = submitted_id((rc, out, err))
    assert "2 tasks" in out
    recs = slurm_cluster.wait(jid, timeout=240)
    assert sorted((r["ArrayTaskId"], r["JobState"], r["ExitCode"]) for r in recs) == [
        ("0", "COMPLETED", "0:0"), ("1", "COMPLETED", "0:0")], [(tmp_path / "logs").iterdir()]
    runs = sorted(os.listdir(tmp_path / "runs"))
    assert runs == [f"sweep-{jid}_0", f"sweep-{jid}_1"]
    for name, lr in zip(runs, (0.2, 0.05)):
        cfg = yaml.safe_load((tmp_path / "runs" / name / "config.yaml").read_text())
        assert cfg["optim"]["lr"] == lr and cfg["run"]["max_steps"] == 2 and cfg["run"]["name"] == name
        assert (tmp_path / "logs" / f"{name}.out").is_file()


PREEMPT = [*SMALL, "run.epochs=2", "checkpoint.every_epoch=true"]  # 2 x 16 optimizer steps


def _final(rows: list[dict]) -> dict:
    """Epoch and end metrics plus every step loss: what must not change when a run is preempted."""
    out = {(r["event"], r.get("epoch")): {k: r[k] for k in ("train_loss", "val_acc", "val_loss") if k in r}
           for r in rows if r["event"] in ("epoch", "end")}
    out["loss"] = {r["step"]: r["loss"] for r in rows if r["event"] == "train"}
    return out


@pytest.fixture(scope="module")
def uninterrupted_run(slurm_cluster, tmp_path_factory):
    """The preemption tests' run without preemption (1 node x 2 processes), submitted at once.

    Returns:
        A function that waits for the job and returns its :func:`_final` metrics (cached), so the
        reference trains while the first preempted job does.
    """
    tmp = tmp_path_factory.mktemp("reference")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, **slurm_cluster.client_env)
    p = subprocess.run([sys.executable, "-m", "dist_sparse.slurm", "submit", "--config", TINY, "--procs-per-node",
                        "2", "--gpus-per-node", "0", "--job-name", "ref", "--log-dir", str(tmp / "logs"), *PREEMPT,
                        f"run.output_dir={tmp / 'runs'}"], cwd=tmp, env=env, capture_output=True, text=True)
    jid = submitted_id((p.returncode, p.stdout, p.stderr))
    cache: dict = {}

    def result() -> dict:
        if not cache:
            [rec] = slurm_cluster.wait(jid, timeout=400)
            assert (rec["JobState"], rec["ExitCode"]) == ("COMPLETED", "0:0"), \
                (tmp / "logs" / f"ref-{jid}.out").read_text()[-3000:]
            cache.update(_final(read_metrics(str(tmp / "runs" / f"ref-{jid}"))))
        return cache

    return result


@pytest.mark.slurm
@pytest.mark.slow
@needs_fmnist
@needs_ddp_yaml
@pytest.mark.parametrize("nodes,procs", [(1, 2), (2, 1)], ids=["1x2", "2x1"])
def test_preempted_job_requeues_resumes_and_matches(slurm_cli, slurm_cluster, uninterrupted_run, tmp_path,
                                                    nodes, procs):
    rc, out, err = slurm_cli(["submit", "--config", TINY, "--nodes", str(nodes), "--procs-per-node", str(procs),
                              "--gpus-per-node", "0", "--job-name", "pre", "--log-dir", str(tmp_path / "logs"),
                              *PREEMPT, f"run.output_dir={tmp_path / 'runs'}"], cwd=tmp_path,
                             env=slurm_cluster.client_env)
    jid = submitted_id((rc, out, err))
    run_dir = tmp_path / "runs" / f"pre-{jid}"
    deadline = time.monotonic() + 240
    while True:  # wait for a few optimizer steps, then preempt in the middle of epoch 0
        rows = read_metrics(str(run_dir)) if (run_dir / "metrics.jsonl").exists() else []
        if sum(r["event"] == "train" for r in rows) >= 3:
            break
        assert time.monotonic() < deadline and slurm_cluster.in_queue(jid), "the job never trained"
        time.sleep(0.2)
    slurm_cluster.run(["scancel", "--signal=USR1", "--batch", jid])  # what --signal=B:USR1@S does at the limit
    [rec] = slurm_cluster.wait(jid, timeout=400)
    log = (tmp_path / "logs" / f"pre-{jid}.out").read_text()
    assert (rec["JobState"], rec["ExitCode"], rec["Restarts"]) == ("COMPLETED", "0:0", "1"), log[-4000:]
    assert "SIGUSR1" in log and f"requeueing job {jid}" in log and "restart 1" in log
    assert "checkpoint.resume=auto" in log.split("restart 1", 1)[1]
    assert not (run_dir / "PREEMPTED").exists()  # removed by the resumed trainer
    rows = read_metrics(str(run_dir))
    starts = [r["step"] for r in rows if r["event"] == "start"]
    assert len(starts) == 2 and 3 <= starts[1] < 16  # resumed from the mid-epoch preemption checkpoint
    assert [r["processes"] for r in rows if r["event"] == "start"] == [2, 2]
    got, want = _final(rows), uninterrupted_run()
    assert len(want) == 4 and sorted(want["loss"]) == list(range(1, 33))
    # Exact: same world size, same global batches, state restored bit for bit (measured equal here).
    assert {k: v for k, v in got.items() if k != "loss"} == {k: v for k, v in want.items() if k != "loss"}
    assert {s: got["loss"][s] for s in range(starts[1] + 1, 33)} == {s: want["loss"][s] for s in range(starts[1] + 1, 33)}
