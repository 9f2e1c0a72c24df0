"""``dist-sparse slurm submit``: validate a config, fill in an sbatch template, submit it.

The templates are ``slurm/train.sbatch`` (one node) and ``slurm/train_multinode.sbatch`` (several
nodes, one ``srun`` task per node). Rendering rewrites their ``#SBATCH`` lines and the variables of
their environment block (``CONFIG=...``, ``BACKEND=...``, ``OVERRIDES=(...)``) and fills the SWEEP
block with one line of overrides per array index; everything else stays as written, so a copy of a
template edited for a cluster (``--template``) renders the same way.

Examples::

    dist-sparse slurm submit --config configs/resnet50_rigl.yaml --nodes 2 --procs-per-node 8 \\
        --partition gpu --time 12:00:00 optim.lr=0.2
    dist-sparse slurm submit --config configs/tiny_resnet20_dense.yaml --procs-per-node 2 --gpus-per-node 0 \\
        --sweep 'optim.lr=0.1,0.05' --dry-run
    python -m dist_sparse.slurm submit ...        # the same, without the console script

Inside a job the templates run ``python -m dist_sparse.slurm check --config X overrides...`` first,
which prints one ``config error: ...`` line and exits 2 on a bad config.
"""
from __future__ import annotations

import argparse
import itertools
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .config import ConfigError, load_config

__all__ = ["SubmitSpec", "add_subcommand", "run", "render_script", "expand_sweep", "split_values",
           "submit", "main", "REPO_DIR"]

REPO_DIR = Path(__file__).resolve().parents[1]  # the checkout: slurm/ and launch/ live here
SINGLE_TEMPLATE = REPO_DIR / "slurm" / "train.sbatch"
MULTI_TEMPLATE = REPO_DIR / "slurm" / "train_multinode.sbatch"


class SlurmError(RuntimeError):
    """A problem with the cluster or the submission; ``str(err)`` is the one line shown to the user."""


@dataclass
class SubmitSpec:
    """Everything a rendered job script depends on."""

    config: str  # path of the YAML config (made absolute when rendering)
    overrides: list = field(default_factory=list)  # key.sub=value overrides for every run of the job
    nodes: int = 1  # nodes; 1 uses slurm/train.sbatch, more use slurm/train_multinode.sbatch
    procs_per_node: int = 1  # training processes per node (= GPUs per node on a GPU cluster)
    gpus_per_node: Optional[int] = None  # GPUs to request per node (None: procs_per_node; 0: none, CPU processes)
    cpus_per_proc: int = 1  # CPU cores per training process (data loading threads live here too)
    backend: str = "ddp"  # accelerate config launch/<backend>.yaml
    job_name: str = "dist-sparse"  # Slurm job name; run directories are <output_dir>/<job_name>-<job id>
    output_dir: str = "runs"  # parent of the run directories (made absolute)
    log_dir: str = "logs"  # where the per-job logs go (made absolute; created on submit)
    partition: Optional[str] = None  # --partition (None: leave the template's line as it is)
    account: Optional[str] = None  # --account (None: leave the template's line as it is)
    time: Optional[str] = None  # --time, e.g. 12:00:00 (None: the template's value)
    signal_seconds: int = 300  # SIGUSR1 this many seconds before the time limit (0: no preemption signal)
    sweep_lines: list = field(default_factory=list)  # one override line per array index ([]: no array)
    extra_sbatch: list = field(default_factory=list)  # further sbatch options, e.g. ["--qos=high"]
    repo_dir: str = str(REPO_DIR)  # checkout the job cd's into (launch/ is read from there)
    venv: str = ""  # python environment the job activates ('' = use PATH as inherited)
    template: Optional[str] = None  # template path (None: chosen by nodes)


# ------------------------------------------------------------------------------------------------
# Sweeps
# ------------------------------------------------------------------------------------------------


def split_values(text: str) -> list[str]:
    """Split ``'0.1,0.05,[1,2]'`` at top-level commas (commas inside [], {} or quotes stay).

    Args:
        text: the values part of a ``--sweep key=v1,v2`` argument.

    Returns:
        The list of value strings, stripped.
    """
    out, depth, quote, cur = [], 0, "", ""
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
            continue
        cur += ch
    out.append(cur.strip())
    return out


def expand_sweep(sweeps: list[str], lines: Optional[list[str]] = None) -> list[str]:
    """The override lines of a job array: the product of ``--sweep`` lists and ``lines``.

    Args:
        sweeps: ``["optim.lr=0.1,0.05", "run.seed=0,1"]`` -- every combination becomes one line, the
            first key varying slowest.
        lines: override lines read from a sweep file (blank lines and ``#`` comments already removed).

    Returns:
        One string of space-separated ``key=value`` overrides per array index; [] when there is no sweep.

    Raises:
        ConfigError: a ``--sweep`` item without ``=`` or with an empty value, or a value with whitespace.
    """
    axes = []
    for item in sweeps:
        if "=" not in item:
            raise ConfigError("--sweep", item, "key.sub=value1,value2,...")
        key, raw = item.split("=", 1)
        values = split_values(raw)
        if not key.strip() or any(v == "" or re.search(r"\s", v) for v in values):
            raise ConfigError("--sweep", item, "key.sub=value1,value2,... with non-empty values without spaces")
        axes.append([f"{key.strip()}={v}" for v in values])
    if lines:
        axes.append(list(lines))
    if not axes:
        return []
    return [" ".join(combo) for combo in itertools.product(*axes)]


def read_sweep_file(path: str) -> list[str]:
    """Override lines of a sweep file: one line per array index; blank lines and ``#`` lines skipped."""
    if not os.path.isfile(path):
        raise ConfigError("--sweep-file", path, "the path of an existing file with one override line per index")
    with open(path, encoding="utf-8") as fh:
        return [ln.strip() for ln in fh if ln.strip() and not ln.strip().startswith("#")]


# ------------------------------------------------------------------------------------------------
# Rendering
# ------------------------------------------------------------------------------------------------

_SBATCH_RE = re.compile(r"^#{1,2}SBATCH\s+(--[a-z-]+)(?:[= ]\S+)?(\s+#.*)?$")
_VAR_RE = re.compile(r"^([A-Z_]+)=(.*?)(\s{2,}#.*)?$")


def _with_comment(code: str, comment: str) -> str:
    """``code`` with the template's comment aligned after it (a filled value needs no "<-- Replace")."""
    comment = comment.strip().replace("<-- Replace: ", "").replace("<-- Replace", "").strip()
    return (code + "  ").ljust(42) + comment if comment not in ("", "#") else code


def _bash_array(items: list[str]) -> str:
    return "(" + " ".join(shlex.quote(x) for x in items) + ")"


def _sbatch_options(spec: SubmitSpec) -> dict:
    """Option -> value for the #SBATCH lines (value None: disable the line; missing: keep it as it is)."""
    gpus = spec.procs_per_node if spec.gpus_per_node is None else spec.gpus_per_node
    array = bool(spec.sweep_lines)
    log = os.path.join(os.path.abspath(spec.log_dir), "%x-%A_%a.out" if array else "%x-%j.out")
    opts = {
        "--job-name": spec.job_name,
        "--nodes": str(spec.nodes),
        "--ntasks-per-node": "1",
        "--gpus-per-node": str(gpus) if gpus > 0 else None,
        "--cpus-per-task": str(spec.procs_per_node * spec.cpus_per_proc),
        "--output": log,
        "--open-mode": "append",
        "--signal": f"B:USR1@{spec.signal_seconds}" if spec.signal_seconds > 0 else None,
        "--requeue": "",
        "--array": f"0-{len(spec.sweep_lines) - 1}" if array else None,
    }
    for key, value in (("--partition", spec.partition), ("--account", spec.account), ("--time", spec.time)):
        if value is not None:
            opts[key] = value
    return opts


def render_script(spec: SubmitSpec) -> str:
    """Fill a template with ``spec``: the text of a job script ready for ``sbatch``.

    Args:
        spec: what to run and where (see :class:`SubmitSpec`); it is not validated here.

    Returns:
        The script text. ``#SBATCH`` lines of options set by ``spec`` are rewritten (and enabled when
        they were ``##SBATCH``), options set to nothing are disabled, options the template lacks are
        added after its last ``#SBATCH`` line; the environment variables and the SWEEP block are filled.

    Raises:
        SlurmError: the template is missing, or lacks a variable or the SWEEP block.
    """
    template = Path(spec.template) if spec.template else (SINGLE_TEMPLATE if spec.nodes == 1 else MULTI_TEMPLATE)
    if not template.is_file():
        raise SlurmError(f"sbatch template {template} not found (pass --template PATH)")
    opts = _sbatch_options(spec)
    env = {
        "REPO_DIR": shlex.quote(os.path.abspath(spec.repo_dir)),
        "VENV": shlex.quote(spec.venv),
        "CONFIG": shlex.quote(os.path.abspath(spec.config)),
        "BACKEND": shlex.quote(spec.backend),
        "PROCS_PER_NODE": str(spec.procs_per_node),
        "OUTPUT_DIR": shlex.quote(os.path.abspath(spec.output_dir)),
        "OVERRIDES": _bash_array(list(spec.overrides)),
        "SWEEP_FILE": "''",
    }
    out, seen, seen_vars, last_sbatch, in_sweep, sweep_done = [], set(), set(), -1, False, False
    for line in template.read_text(encoding="utf-8").splitlines():
        if in_sweep:
            if line.strip() == "SWEEP":  # end of the heredoc: put the lines in, drop the template's
                out.extend(spec.sweep_lines)
                out.append(line)
                in_sweep, sweep_done = False, True
            continue
        m = _SBATCH_RE.match(line)
        if m:
            opt, comment = m.group(1), m.group(2) or ""
            if opt in opts:
                value = opts[opt]
                seen.add(opt)
                if value is None:
                    line = line if line.startswith("##") else "#" + line
                else:
                    directive = f"#SBATCH {opt}" + (f"={value}" if value != "" else "")
                    line = _with_comment(directive, comment)
            out.append(line)
            last_sbatch = len(out) - 1
            continue
        m = _VAR_RE.match(line)
        if m and m.group(1) in env and m.group(1) not in seen_vars:
            name, comment = m.group(1), m.group(3) or ""
            seen_vars.add(name)
            line = _with_comment(f"{name}={env[name]}", comment)
        if line.startswith("read -r -d '' SWEEP_LINES <<'SWEEP'"):
            in_sweep = True
        out.append(line)
    missing = sorted(set(env) - seen_vars)
    if missing or not sweep_done:
        what = ", ".join(missing) if missing else "the SWEEP_LINES block"
        raise SlurmError(f"template {template} lacks {what}; start from slurm/train.sbatch")
    extra = [f"#SBATCH {opt}" + (f"={v}" if v != "" else "") for opt, v in opts.items()
             if opt not in seen and v is not None]
    extra += [f"#SBATCH {x}" for x in spec.extra_sbatch]
    out[last_sbatch + 1:last_sbatch + 1] = extra
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------------------------
# Validation and submission
# ------------------------------------------------------------------------------------------------


def validate_spec(spec: SubmitSpec) -> None:
    """Check the submission: the config (with every sweep line) loads, numbers are in range.

    Raises:
        ConfigError: naming the first bad option or config key; a sweep line's error names the line.
    """
    for key, value, ok, allowed in (
        ("--nodes", spec.nodes, spec.nodes >= 1, "an integer >= 1"),
        ("--procs-per-node", spec.procs_per_node, spec.procs_per_node >= 1, "an integer >= 1"),
        ("--gpus-per-node", spec.gpus_per_node, spec.gpus_per_node is None or spec.gpus_per_node >= 0,
         "an integer >= 0 (0: CPU processes)"),
        ("--cpus-per-proc", spec.cpus_per_proc, spec.cpus_per_proc >= 1, "an integer >= 1"),
        ("--signal-seconds", spec.signal_seconds, spec.signal_seconds >= 0, "an integer >= 0 (0: off)"),
        ("--job-name", spec.job_name, bool(spec.job_name) and not re.search(r"[\s/]", spec.job_name),
         "a non-empty name without spaces or '/'"),
    ):
        if not ok:
            raise ConfigError(key, value, allowed)
    launch_dir = Path(spec.repo_dir) / "launch"
    backends = sorted(p.stem for p in launch_dir.glob("*.yaml"))
    if not (launch_dir / f"{spec.backend}.yaml").is_file():
        raise ConfigError("--backend", spec.backend, "one of " + (", ".join(backends) or f"the files {launch_dir}/*.yaml"))
    cfg = load_config(spec.config, list(spec.overrides))
    world = spec.nodes * spec.procs_per_node
    if cfg.run.num_processes not in (0, world):
        raise ConfigError("run.num_processes", cfg.run.num_processes,
                          f"0 or {world} (= --nodes {spec.nodes} x --procs-per-node {spec.procs_per_node})")
    for i, line in enumerate(spec.sweep_lines):
        if line.strip() == "SWEEP":
            raise ConfigError("--sweep-file", line, "override lines (key.sub=value ...)")
        try:
            load_config(spec.config, list(spec.overrides) + line.split())
        except ConfigError as err:
            raise ConfigError(err.key, err.value, f"{err.allowed} (sweep line {i}: {line})") from None


def submit(spec: SubmitSpec, script: str) -> str:
    """Submit ``script`` with ``sbatch --parsable``; keep a copy beside the logs.

    Returns:
        The job id (for an array: the array's job id).

    Raises:
        SlurmError: sbatch is missing, or the cluster refused the job (with sbatch's message).
    """
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise SlurmError("sbatch not found on PATH: run this on a Slurm login node (or use --dry-run to see the script)")
    os.makedirs(os.path.abspath(spec.log_dir), exist_ok=True)  # sbatch does not create the log directory
    r = subprocess.run([sbatch, "--parsable"], input=script, capture_output=True, text=True)
    if r.returncode != 0:
        msg = " ".join((r.stderr or r.stdout).split()) or f"exit status {r.returncode}"
        raise SlurmError(f"sbatch refused the job: {msg}")
    jobid = r.stdout.strip().split(";")[0]
    if not jobid.isdigit():
        raise SlurmError(f"unexpected sbatch output: {r.stdout.strip()!r}")
    Path(os.path.abspath(spec.log_dir), f"{spec.job_name}-{jobid}.sbatch").write_text(script, encoding="utf-8")
    return jobid


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------


def add_subcommand(subparsers) -> argparse.ArgumentParser:
    """Add ``slurm`` (with ``submit`` and ``check``) to an argparse ``subparsers`` object.

    Args:
        subparsers: the result of ``parser.add_subparsers()`` of the ``dist-sparse`` command.

    Returns:
        The ``slurm`` parser; its ``func`` default is :func:`run`.
    """
    p = subparsers.add_parser("slurm", help="submit training jobs to Slurm",
                              description="Submit dist_sparse training jobs to a Slurm cluster.")
    p.set_defaults(func=run)
    sub = p.add_subparsers(dest="slurm_command", metavar="{submit,check}")
    sub.required = True
    s = sub.add_parser("submit", help="validate a config, render an sbatch script and submit it",
                       description="Validate the config, render slurm/train.sbatch (one node) or "
                                   "slurm/train_multinode.sbatch (several) and submit it with sbatch.")
    s.add_argument("--config", required=True, help="YAML config of the run")
    s.add_argument("--nodes", type=int, default=1, help="number of nodes (default 1)")
    s.add_argument("--procs-per-node", type=int, default=1, help="training processes per node, = GPUs per node (default 1)")
    s.add_argument("--gpus-per-node", type=int, default=None, help="GPUs to request per node (default: --procs-per-node; 0: CPU processes)")
    s.add_argument("--cpus-per-proc", type=int, default=1, help="CPU cores per process (default 1)")
    s.add_argument("--backend", default="ddp", help="accelerate config launch/<backend>.yaml (default ddp)")
    s.add_argument("--partition", default=None, help="Slurm partition")
    s.add_argument("--account", default=None, help="Slurm account")
    s.add_argument("--time", default=None, help="wall-clock limit, e.g. 12:00:00")
    s.add_argument("--job-name", default=None, help="job name (default: the config's run.name)")
    s.add_argument("--signal-seconds", type=int, default=300,
                   help="send SIGUSR1 this many seconds before the time limit to checkpoint and requeue (0: off; default 300)")
    s.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2",
                   help="job array over values of KEY (repeat for a grid)")
    s.add_argument("--sweep-file", default=None, help="job array: one line of overrides per index")
    s.add_argument("--log-dir", default="logs", help="directory of the job logs (default ./logs)")
    s.add_argument("--sbatch-option", action="append", default=[], metavar="OPT",
                   help="extra #SBATCH option, e.g. --sbatch-option=--qos=high (repeatable)")
    s.add_argument("--template", default=None, help="use this sbatch template instead of slurm/*.sbatch")
    s.add_argument("--dry-run", action="store_true", help="print the script instead of submitting it")
    s.add_argument("overrides", nargs="*", help="key.sub=value config overrides")
    c = sub.add_parser("check", help="validate a config (used inside jobs)",
                       description="Load and validate the config; print one line, exit 2 when it is bad.")
    c.add_argument("--config", required=True, help="YAML config")
    c.add_argument("overrides", nargs="*", help="key.sub=value config overrides")
    return p


def _spec_from_args(args) -> SubmitSpec:
    cfg = load_config(args.config, list(args.overrides))
    lines = read_sweep_file(args.sweep_file) if args.sweep_file else None
    in_venv = sys.prefix != getattr(sys, "base_prefix", sys.prefix)
    return SubmitSpec(
        config=args.config, overrides=list(args.overrides), nodes=args.nodes,
        procs_per_node=args.procs_per_node, gpus_per_node=args.gpus_per_node,
        cpus_per_proc=args.cpus_per_proc, backend=args.backend,
        job_name=args.job_name or cfg.run.name, output_dir=cfg.run.output_dir, log_dir=args.log_dir,
        partition=args.partition, account=args.account, time=args.time,
        signal_seconds=args.signal_seconds, sweep_lines=expand_sweep(args.sweep, lines),
        extra_sbatch=list(args.sbatch_option), venv=sys.prefix if in_venv else "", template=args.template)


def run(args) -> int:
    """Run ``dist-sparse slurm submit|check`` from parsed arguments.

    Args:
        args: the namespace from the parser built by :func:`add_subcommand`.

    Returns:
        The exit status: 0 done, 1 cluster/submission problem, 2 bad config or option.
    """
    try:
        if args.slurm_command == "check":
            cfg = load_config(args.config, list(args.overrides))
            print(f"config ok: {args.config} -> run dir {cfg.run_dir}", flush=True)
            return 0
        spec = _spec_from_args(args)
        validate_spec(spec)
        script = render_script(spec)
        if args.dry_run:
            sys.stdout.write(script)
            return 0
        jobid = submit(spec, script)
    except ConfigError as err:
        print(str(err), file=sys.stderr)
        return 2
    except SlurmError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    logs = os.path.abspath(spec.log_dir)
    world = spec.nodes * spec.procs_per_node
    out = os.path.abspath(spec.output_dir)
    if spec.sweep_lines:
        n = len(spec.sweep_lines)
        print(f"submitted array job {jobid} ({n} tasks, each {spec.nodes} node(s) x {spec.procs_per_node} = "
              f"{world} processes, backend {spec.backend})")
        print(f"logs:     {logs}/{spec.job_name}-{jobid}_<0..{n - 1}>.out")
        print(f"run dirs: {out}/{spec.job_name}-{jobid}_<0..{n - 1}>")
    else:
        print(f"submitted job {jobid} ({spec.nodes} node(s) x {spec.procs_per_node} = {world} processes, "
              f"backend {spec.backend})")
        print(f"log:      {logs}/{spec.job_name}-{jobid}.out")
        print(f"run dir:  {out}/{spec.job_name}-{jobid}")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m dist_sparse.slurm submit|check ...``; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m dist_sparse.slurm")
    sub = parser.add_subparsers(dest="command")
    slurm = add_subcommand(sub)
    # `python -m dist_sparse.slurm submit ...` == `dist-sparse slurm submit ...`
    args = slurm.parse_args(argv)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
