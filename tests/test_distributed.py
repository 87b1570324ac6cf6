"""Distributed extract: the LPT split, and real 2-process gloo jobs (torchrun) whose adapter must be byte for byte
the single-process one (same seed, OMP_NUM_THREADS=1 on both sides)."""

from __future__ import annotations

import itertools
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import make_pair
from lowrank_tools.extract.distributed import assign, current_share, layer_cost, torchrun_group, torchrun_world_size
from lowrank_tools.errors import DistributedError, InvalidOption

ROOT = Path(__file__).resolve().parents[1]
HAVE_GLOO = torch.distributed.is_available() and torch.distributed.is_gloo_available()

# a small Llama-like stack: same-shape runs, a tall and a wide MLP, an embedding, a conv kernel, a norm
SHAPES = {
    "model.embed_tokens.weight": (50, 32),
    **{f"model.layers.{i}.self_attn.{p}_proj.weight": (32, 32) for i in range(2) for p in "qkvo"},
    **{f"model.layers.{i}.mlp.{p}_proj.weight": (48, 32) for i in range(2) for p in ("gate", "up")},
    **{f"model.layers.{i}.mlp.down_proj.weight": (32, 48) for i in range(2)},
    "model.layers.0.input_layernorm.weight": (32,),
    "vision.patch_embed.proj.weight": (16, 4, 3, 3),
}
ZERO = "model.layers.1.self_attn.k_proj.weight"  # a layer the fine-tune did not change
NAN = "model.layers.1.mlp.up_proj.weight"


# ------------------------------------------------------------------------------------------ the split


def test_assign_is_lpt_deterministic_and_complete():
    costs = [5, 9, 2, 9, 7, 1, 4]
    shares = assign(costs, 3)
    assert shares == assign(list(costs), 3)
    assert sorted(i for s in shares for i in s) == list(range(len(costs)))
    assert all(s == sorted(s) for s in shares)
    # by hand: 9(1)->r0, 9(3)->r1, 7(4)->r2, 5(0)->r2 (7<9, then r2 at 12), 4(6)->r0 (9, lower rank), 2(2)->r1, 1(5)->r1
    assert shares == [[1, 6], [2, 3, 5], [0, 4]]


def test_assign_ties_go_to_lower_index_and_rank():
    assert assign([1, 1, 1, 1], 2) == [[0, 2], [1, 3]]
    assert assign([3, 3], 4) == [[0], [1], [], []]  # more ranks than units: some ranks get nothing
    assert assign([], 2) == [[], []]
    with pytest.raises(ValueError, match="world_size"):
        assign([1], 0)


def test_assign_within_four_thirds_of_the_best_split():
    rng = random.Random(0)
    for _ in range(40):
        n, world = rng.randint(1, 8), rng.randint(2, 3)
        costs = [rng.randint(1, 100) for _ in range(n)]
        got = max(sum(costs[i] for i in share) for share in assign(costs, world))
        best = min(max(sum(c for c, r in zip(costs, split) if r == rank) for rank in range(world))
                   for split in itertools.product(range(world), repeat=n))  # brute force
        assert got <= best * 4 / 3 - best / (3 * world) + 1e-9  # Graham's bound for LPT


def test_layer_cost_counts_sketch_width_capped_by_the_smaller_side():
    assert layer_cost(4096, 11008, 64, 10) == 4096 * 11008 * 74
    assert layer_cost(32, 48, 64, 10) == 32 * 48 * 32  # k + p beyond the side: an exact SVD's work


def test_alone_without_a_process_group():
    assert current_share(None) is None
    assert current_share(False) is None
    with pytest.raises(DistributedError, match="no torch.distributed process group"):
        current_share(True)


def test_torchrun_group_is_a_no_op_for_one_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with torchrun_group("cpu") as rank:
        assert rank == 0
    assert not torch.distributed.is_initialized()
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(InvalidOption, match="WORLD_SIZE='two'"):
        torchrun_world_size()


# ------------------------------------------------------------------------------------------ real 2-process jobs


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("dist")
    base, tuned = make_pair(SHAPES, k=3, dtype=torch.bfloat16)
    tuned[ZERO] = base[ZERO].clone()
    save_file(base, str(folder / "base.safetensors"))
    save_file(tuned, str(folder / "tuned.safetensors"))
    tuned[NAN] = tuned[NAN].clone()
    tuned[NAN][1, 2] = float("nan")
    save_file(tuned, str(folder / "tuned_nan.safetensors"))
    return folder


def _run(args: list[str], *, nproc: int, cwd: Path) -> subprocess.CompletedProcess:
    """``python -m lowrank_tools ...``-style args under torchrun with ``nproc`` processes, or alone (nproc=0)."""
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR",
                                                               "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="")
    launch = [sys.executable] if nproc == 0 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                  f"--nproc-per-node={nproc}"]
    return subprocess.run(launch + args, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.skipif(not HAVE_GLOO, reason="torch.distributed with gloo is not available")
def test_torchrun_cli_writes_the_single_process_adapter_byte_for_byte(pair: Path):
    args = ["base.safetensors", "tuned.safetensors", "--rank", "4", "--conv-rank", "2", "--dtype", "float32"]
    alone = _run(["-m", "lowrank_tools", "extract", *args, "-o", "alone", "-q"], nproc=0, cwd=pair)
    assert alone.returncode == 0, alone.stderr
    job = _run(["-m", "lowrank_tools", "extract", *args, "-o", "job", "--report", "job.json"], nproc=2, cwd=pair)
    assert job.returncode == 0, job.stderr
    assert _files(pair / "job") == _files(pair / "alone")  # adapter_model.safetensors and adapter_config.json
    assert len(_files(pair / "alone")) == 2
    report = json.loads((pair / "job.json").read_text())  # written once, by rank 0, for every layer
    assert len(report["layers"]) == len(SHAPES) - 2  # all but the norm and the zero delta
    assert report["skipped"]["zero delta or nothing kept"] == ["model.layers.1.self_attn.k_proj"]
    assert job.stdout.count("wrote job") == 1  # rank 1 prints nothing


_API_JOB = r"""
import json, sys
from lowrank_tools import RankRule, extract, save_adapter
from lowrank_tools.extract.distributed import torchrun_group

folder, out = sys.argv[1], sys.argv[2]
base, tuned = f"{folder}/base.safetensors", f"{folder}/tuned.safetensors"
cases = {
    "kohya.safetensors": dict(rule=RankRule(rank=4), embeddings=False),
    "budget": dict(budget=2500, rule=RankRule(rank=8)),
    "energy": dict(rule=RankRule(energy=0.9), method="exact", alpha=8.0),
}
with torchrun_group("cpu") as rank:
    seen = {}
    for name, kwargs in cases.items():
        result = extract(base, tuned, **kwargs)  # distributed=None: a group of 2 is initialised under torchrun
        seen[name] = [result.primary, len(result.adapter.modules)]
        if result.primary:
            save_adapter(result.adapter, f"{out}/{name}", format="kohya" if name.endswith(".safetensors") else "peft")
    for name, kwargs in {"nan": dict(tuned=f"{folder}/tuned_nan.safetensors"),
                         "plans": dict(tuned=tuned, include=[".*"] if rank == 0 else ["layers"])}.items():
        try:
            extract(base, kwargs.pop("tuned"), rule=RankRule(rank=4), **kwargs)
            seen[name] = None
        except Exception as exc:
            seen[name] = f"{type(exc).__name__}: {exc}"
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump(seen, f)
"""


@pytest.mark.skipif(not HAVE_GLOO, reason="torch.distributed with gloo is not available")
def test_python_api_job_matches_single_process_and_shares_failures(pair: Path):
    (pair / "job.py").write_text(_API_JOB)
    for name, nproc in (("api_alone", 0), ("api_job", 2)):
        (pair / name).mkdir()
        done = _run(["job.py", str(pair), name], nproc=nproc, cwd=pair)
        assert done.returncode == 0, done.stderr
    alone, job = _files(pair / "api_alone"), _files(pair / "api_job")
    written = {k for k in alone if not k.startswith("rank")}
    assert written == {"kohya.safetensors", "budget/adapter_model.safetensors", "budget/adapter_config.json",
                       "energy/adapter_model.safetensors", "energy/adapter_config.json"}
    for name in written:
        assert job[name] == alone[name], name
    ranks = [json.loads(job[f"rank{r}.json"]) for r in (0, 1)]
    assert ranks[0]["kohya.safetensors"][0] is True and ranks[1]["kohya.safetensors"] == [False, 0]
    for seen in ranks:  # the rank whose share held the NaN raised; the other got its error at the next exchange
        assert seen["nan"].startswith("NonFiniteWeight: tuned tensor model.layers.1.mlp.up_proj.weight holds 1 NaN")
        assert seen["plans"].startswith("DistributedError: rank 1 planned other layers than rank 0")
    assert sum("(on rank " in seen["nan"] for seen in ranks) == 1
    assert json.loads(alone["rank0.json"])["nan"].startswith("NonFiniteWeight")
