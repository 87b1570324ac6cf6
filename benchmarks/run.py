"""Every benchmark in one command: prints Markdown and writes benchmarks/RESULTS.md (machine, command, load, verdict).

    python benchmarks/run.py                      # everything on the CPU (about 30-40 minutes on 2 quiet cores)
    python benchmarks/run.py --quick              # a smoke run of every part on small shapes (a few minutes)
    python benchmarks/run.py --parts e2e,memory   # some parts (then printed only, unless --output is given)
    python benchmarks/run.py --parts gpu --device cuda     # the 7B-shaped GPU figures (see gpu_check.sh)

Parts (all but ``gpu`` by default):
  e2e           extract end to end (read, subtract, factor, measure, save) on a synthetic Llama stack of --blocks
                blocks (q/k/v/o 4096x4096, MLP 4096x11008, bf16 on disk; see llama_stack.py) at r=64, the default
                method against the exact SVD the peers run, same data, same run. Bars: >= 30x faster (best of 2
                runs against 1), norm-weighted rel_error within 1% of exact's.
  memory        peak RSS of `lowrank-tools extract` and `apply` (CLI processes) at --blocks and twice as many blocks.
                Bar: the larger checkpoint raises the peak by no more than the output it adds (extract: the factors
                of the extra layers; apply: the larger adapter it loads) plus 64 MiB.
  flat          a pair of ~6 GB checkpoints (15 blocks, bf16) under /tmp, extracted and applied; bar: peak RSS
                under 1.5 GB. Writes ~24 GB to /tmp (deleted after); never part of the test suite.
  svd           benchmarks/bench_extract.py (one matrix: randomized vs exact SVD; 64-layer extract memory)
  resize-merge  benchmarks/bench_resize_merge.py (QR cores vs dense B @ A + SVD)
  analyze       benchmarks/bench_analyze.py
  apply         benchmarks/bench_apply_memory.py (streamed apply vs load-everything)
  gpu           (--device cuda) a Llama-7B-shaped pair (32 blocks + embeddings, bf16, 13 GB each) extracted at
                r=64 end to end on the GPU (target: under 60 s), one block also exactly, then resize and merge.

Peak RSS is what `/usr/bin/time -v` reports (Maximum resident set size: pages of mapped files that were touched
count too); where /usr/bin/time is missing, the same kernel figure from os.wait4's rusage of that child. This
process never imports torch, so the children's figures start small. Timing is sensitive to other work on the
machine: the 1-minute load average is recorded before and after every part. Exits 1 when a bar is missed
(never with --quick: small shapes are fixed costs).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PARTS = ["e2e", "memory", "flat", "svd", "resize-merge", "analyze", "apply"]
SCRIPTS = {"svd": "bench_extract.py", "resize-merge": "bench_resize_merge.py", "analyze": "bench_analyze.py",
           "apply": "bench_apply_memory.py"}
RANK, SPEED_BAR, ERROR_BAR, FLAT_BAR, SLACK = 64, 30.0, 0.01, 1.5e9, 64 * 2**20
GPU_TARGET_S = 60.0
MiB = 2**20


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT))


def _child(args: list[str], *, timeout: float | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=_env(), timeout=timeout)
    if proc.returncode not in (0, 1):
        raise SystemExit(f"failed: {shlex.join(args)}\n{proc.stderr[-3000:]}")
    return proc


def _json_child(args: list[str]) -> dict:
    proc = _child(args)
    if proc.returncode != 0:
        raise SystemExit(f"failed: {shlex.join(args)}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def peak_rss(args: list[str]) -> tuple[int, str]:
    """(peak RSS in bytes, how it was measured) of ``python args...`` run as a child."""
    cmd = [sys.executable, *args]
    if Path("/usr/bin/time").exists():
        proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, env=_env())
        if proc.returncode != 0:
            raise SystemExit(f"failed: {shlex.join(cmd)}\n{proc.stderr[-3000:]}")
        kib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
        return kib * 1024, "/usr/bin/time -v"
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage (ru_maxrss in KiB on Linux)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"failed: {shlex.join(cmd)}\n{proc.stderr.read().decode()[-3000:]}")
    return usage.ru_maxrss * 1024, "os.wait4 rusage (ru_maxrss)"


def load() -> float:
    return os.getloadavg()[0]


# ------------------------------------------------------------------------------------------------ the parts


class Stack:
    """A generated pair under the work folder, made once and reused by the parts that need its size."""

    def __init__(self, work: Path, blocks: int, hidden: int, inter: int, vocab: int = 0, device: str = "cpu"):
        self.folder = work / (f"stack-{blocks}x{hidden}" + (f"-v{vocab}" if vocab else ""))
        self.blocks, self.hidden, self.inter = blocks, hidden, inter
        if not (self.folder / "tuned.safetensors").exists():
            self.info = _json_child([str(HERE / "llama_stack.py"), "generate", str(self.folder), "--blocks",
                                     str(blocks), "--hidden", str(hidden), "--inter", str(inter), "--vocab",
                                     str(vocab), "--device", device])
        self.base, self.tuned = self.folder / "base.safetensors", self.folder / "tuned.safetensors"
        self.bytes = self.base.stat().st_size

    def drop(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def part_e2e(work: Path, opts) -> tuple[str, list[str]]:
    stack = Stack(work, opts.blocks, opts.hidden, opts.inter)
    got = _json_child([str(HERE / "llama_stack.py"), "time", str(stack.folder), "--rank", str(RANK),
                       "--methods", "auto,exact", "--repeats", "auto=2,exact=1"])
    best = {m: min((r for r in got["runs"] if r["method"] == m), key=lambda r: r["seconds"]) for m in ("auto", "exact")}
    speedup = best["exact"]["seconds"] / best["auto"]["seconds"]
    excess = best["auto"]["rel_error"] / best["exact"]["rel_error"] - 1
    rows = ["| method | run | layers | end-to-end s | norm-weighted rel_error | load before / after |",
            "|---|---|---|---|---|---|"]
    for i, r in enumerate(got["runs"]):
        rows.append(f"| {r['method']} | {i + 1} | {r['layers']} | {r['seconds']:.2f} | {r['rel_error']:.6f} | "
                    f"{r['load_before']:.2f} / {r['load_after']:.2f} |")
    text = (f"{opts.blocks} blocks of q/k/v/o {opts.hidden}x{opts.hidden} and gate/up/down {opts.inter}x{opts.hidden} "
            f"({stack.bytes / 1e9:.2f} GB per checkpoint, bf16), r={RANK}, {got['threads']} torch threads, "
            f"`extract` + `save_adapter` in one process after a warm-up.\n\n" + "\n".join(rows) +
            f"\n\n**speed-up {speedup:.1f}x** (exact best / default best), rel_error excess **{100 * excess:+.3f}%** "
            f"(bars: >= {SPEED_BAR:.0f}x, <= {100 * ERROR_BAR:.0f}%)")
    failed = []
    if speedup < SPEED_BAR:
        failed.append(f"e2e: speed-up {speedup:.1f}x < {SPEED_BAR:.0f}x")
    if excess > ERROR_BAR:
        failed.append(f"e2e: rel_error excess {100 * excess:.2f}% > {100 * ERROR_BAR:.0f}%")
    return text, failed


def _extract_and_apply(stack: Stack, tag: str) -> dict:
    out = stack.folder / f"adapter-{tag}"
    merged = stack.folder / f"merged-{tag}.safetensors"
    ext, how = peak_rss(["-m", "lowrank_tools", "extract", str(stack.base), str(stack.tuned), "-o", str(out),
                         "--rank", str(RANK), "-q", "--force"])
    adapter_bytes = sum(p.stat().st_size for p in out.rglob("*.safetensors"))
    app, _ = peak_rss(["-m", "lowrank_tools", "apply", str(stack.base), str(out), "-o", str(merged), "-q", "--force"])
    merged.unlink(missing_ok=True)
    shutil.rmtree(out, ignore_errors=True)
    return {"blocks": stack.blocks, "gb": stack.bytes / 1e9, "extract": ext, "apply": app, "adapter": adapter_bytes,
            "how": how}


def _memory_rows(rows: list[dict]) -> str:
    lines = ["| blocks | GB per checkpoint | adapter MiB (r=64) | extract peak RSS MiB | apply peak RSS MiB |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['blocks']} | {r['gb']:.2f} | {r['adapter'] / MiB:.0f} | {r['extract'] / MiB:.0f} | "
              f"{r['apply'] / MiB:.0f} |" for r in rows]
    return "\n".join(lines)


def part_memory(work: Path, opts) -> tuple[str, list[str]]:
    rows = []
    for blocks in (opts.blocks, 2 * opts.blocks):
        stack = Stack(work, blocks, opts.hidden, opts.inter)
        rows.append(_extract_and_apply(stack, "mem"))
        if blocks != opts.blocks:
            stack.drop()
    small, large = rows
    growth = large["adapter"] - small["adapter"]  # the extra factors written (extract) and loaded (apply)
    failed = []
    for what in ("extract", "apply"):
        allowed = small[what] + growth + SLACK
        if large[what] > allowed:
            failed.append(f"memory: {what} peak {large[what] / MiB:.0f} MiB at {large['blocks']} blocks > "
                          f"{allowed / MiB:.0f} MiB ({small[what] / MiB:.0f} at {small['blocks']} + adapter growth "
                          f"{growth / MiB:.0f} + 64)")
    text = (f"Peak RSS of the CLI processes ({small['how']}), r={RANK}.\n\n{_memory_rows(rows)}\n\n"
            f"Bar: twice the layers raise each peak by at most the adapter growth ({growth / MiB:.0f} MiB) + 64 MiB.")
    return text, failed


def part_flat(work: Path, opts) -> tuple[str, list[str]]:
    per_block = 2 * (4 * opts.hidden**2 + 3 * opts.hidden * opts.inter + 2 * opts.hidden)  # bf16 bytes
    blocks = max(2, math.ceil(opts.flat_gb * 1e9 / per_block))
    stack = Stack(work, blocks, opts.hidden, opts.inter)
    try:
        row = _extract_and_apply(stack, "flat")
    finally:
        stack.drop()
    failed = [f"flat: {w} peak RSS {row[w] / 1e9:.2f} GB >= {FLAT_BAR / 1e9:.1f} GB on {row['gb']:.2f} GB "
              f"checkpoints" for w in ("extract", "apply") if row[w] >= FLAT_BAR]
    text = (f"A pair of {row['gb']:.2f} GB checkpoints ({blocks} blocks, bf16) under {work}, deleted after. Peak RSS "
            f"({row['how']}): extract **{row['extract'] / 1e9:.2f} GB**, apply **{row['apply'] / 1e9:.2f} GB** "
            f"(bar: under {FLAT_BAR / 1e9:.1f} GB).\n\n{_memory_rows([row])}")
    return text, failed


def part_script(name: str, opts) -> tuple[str, list[str]]:
    args = [str(HERE / SCRIPTS[name])] + (["--quick"] if opts.quick else [])
    proc = _child(args)
    text = proc.stdout.strip()
    text = re.sub(r"^# .*\n+", "", text)  # the script's own title: the section has one
    failed = [f"{name}: {line.strip()}" for line in text.splitlines() if line.startswith("FAILED")]
    if proc.returncode != 0 and not failed:
        failed.append(f"{name}: exit status {proc.returncode}")
    return f"`python benchmarks/{SCRIPTS[name]}{' --quick' if opts.quick else ''}`\n\n{text}", failed


def part_gpu(work: Path, opts) -> tuple[str, list[str]]:
    """Each step is printed on stderr as it ends, so that a run stopped by its time limit still shows it."""
    started = time.perf_counter()
    stack = Stack(work, opts.gpu_blocks, opts.hidden, opts.inter, vocab=opts.vocab, device=opts.device)
    print(f"   generated {stack.bytes / 1e9:.2f} GB x 2 in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    kept = work / "gpu-adapters"
    tool = [str(HERE / "llama_stack.py")]
    rows, failed = [], []
    try:
        ours = _json_child(tool + ["time", str(stack.folder), "--rank", str(RANK), "--methods", "auto", "--repeats",
                                   "auto=1", "--device", opts.device, "--out", str(kept)])
        run = ours["runs"][0]
        rows.append(f"| extract, whole model, end to end ({run['layers']} layers) | **{run['seconds']:.1f}** | "
                    f"{run['rel_error']:.6f} |")
        print(f"   {rows[-1]}  peak RSS {ours['peak_rss'] / 2**30:.2f} GiB, GPU memory "
              f"{ours['peak_gpu_memory'] / 2**30:.2f} GiB", file=sys.stderr)
        if run["seconds"] >= GPU_TARGET_S:
            failed.append(f"gpu: extract {run['seconds']:.1f} s >= {GPU_TARGET_S:.0f} s")
        rm = _json_child(tool + ["resize-merge", str(kept / "auto"), "--device", opts.device])
        rows.append(f"| resize {rm['modules']} modules r={rm['rank']} -> {max(1, rm['rank'] // 2)} | "
                    f"{rm['resize_s']:.2f} | {rm['resize_rel_error']:.2e} |")
        rows.append(f"| merge 2 x {rm['modules']} modules -> r={rm['rank']} | {rm['merge_s']:.2f} | "
                    f"{rm['merge_rel_error']:.2e} |")
        print("   " + "\n   ".join(rows[-2:]), file=sys.stderr)
        block0 = _json_child(tool + ["time", str(stack.folder), "--rank", str(RANK), "--methods", "auto,exact",
                                     "--repeats", "auto=1,exact=1", "--device", opts.device,
                                     "--include", r"^model\.layers\.0\."])
        for r in block0["runs"]:
            how = "exact SVD" if r["method"] == "exact" else "default"
            rows.append(f"| extract, block 0 ({r['layers']} layers), {how} | {r['seconds']:.2f} | "
                        f"{r['rel_error']:.6f} |")
        print("   " + "\n   ".join(rows[-2:]), file=sys.stderr)
    finally:
        stack.drop()
        shutil.rmtree(kept, ignore_errors=True)
    text = (f"{ours['gpu']}: Llama-7B-shaped pair, {opts.gpu_blocks} blocks + embed_tokens/lm_head "
            f"{opts.vocab}x{opts.hidden}, bf16, {stack.bytes / 1e9:.2f} GB per checkpoint (page cache warm: just "
            f"written), r={RANK}, TF32 off. Extract peak RSS {ours['peak_rss'] / 2**30:.2f} GiB, GPU memory "
            f"{ours['peak_gpu_memory'] / 2**30:.2f} GiB.\n\n| step | seconds | rel_error |\n|---|---|---|\n"
            + "\n".join(rows) + f"\n\nTarget: the whole-model extract under {GPU_TARGET_S:.0f} s.")
    return text, failed


def merge_sections(old: str, new_sections: list[str]) -> str:
    """``old`` (a RESULTS.md) with each ``## name`` section of ``new_sections`` replacing its namesake (or added
    before the verdict)."""
    for section in new_sections:
        name = section.split("\n", 1)[0]
        pattern = re.compile(rf"^{re.escape(name)}\n.*?(?=^## |\Z)", re.S | re.M)
        if pattern.search(old):
            old = pattern.sub(lambda _: section + "\n\n", old, count=1)
        else:
            at = old.find("## Verdict")
            old = old[:at] + section + "\n\n" + old[at:] if at >= 0 else old + "\n" + section
    return old


# ------------------------------------------------------------------------------------------------ report


def machine(device: str) -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or platform.machine())
    mem = next((int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal")), 0)
    probe = ("import torch, json; print(json.dumps([torch.__version__, torch.get_num_threads(), "
             "torch.cuda.get_device_name() if torch.cuda.is_available() else None]))")
    version, threads, gpu = json.loads(_child(["-c", probe]).stdout)
    text = (f"{cpu}, {os.cpu_count()} cores, {mem / 2**30:.1f} GiB RAM, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}, torch {version} ({threads} threads)")
    return text + (f", GPU: {gpu}" if gpu and device.startswith("cuda") else "")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 2)[2])
    ap.add_argument("--quick", action="store_true", help="small shapes for a smoke run; no verdict")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of: {', '.join(PARTS + ['gpu'])}")
    ap.add_argument("--blocks", type=int, help="blocks of the e2e stack (memory: this and twice); default 3")
    ap.add_argument("--flat-gb", type=float, default=6.0, help="size of each checkpoint of the flat part")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda for the gpu part")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()), help="where the pairs are generated")
    ap.add_argument("--output", type=Path, help="Markdown file (default: benchmarks/RESULTS.md for a full run)")
    ap.add_argument("--merge", action="store_true", help="replace this run's sections in an existing --output "
                    "(e.g. the gpu part into RESULTS.md) instead of rewriting it")
    opts = ap.parse_args()
    parts = [p.strip() for p in opts.parts.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS + ["gpu"]]
    if unknown:
        ap.error(f"unknown part(s) {', '.join(unknown)}: choose from {', '.join(PARTS + ['gpu'])}")
    opts.hidden, opts.inter = (512, 1376) if opts.quick else (4096, 11008)
    opts.blocks = opts.blocks or (2 if opts.quick else 3)
    opts.gpu_blocks, opts.vocab = (2, 1000) if opts.quick else (32, 32000)
    opts.flat_gb = min(opts.flat_gb, 0.1) if opts.quick else opts.flat_gb
    output = opts.output or (HERE / "RESULTS.md" if set(parts) >= set(PARTS) and not opts.quick else None)
    work = Path(tempfile.mkdtemp(prefix="lowrank-bench-", dir=opts.work))
    command = shlex.join(["python", "benchmarks/run.py", *sys.argv[1:]])
    started, sections, failed = time.time(), [], []
    try:
        for part in parts:
            before = load()
            t0 = time.perf_counter()
            print(f"== {part} (load {before:.2f}) ...", file=sys.stderr, flush=True)
            if part in SCRIPTS:
                text, missed = part_script(part, opts)
            else:
                runner = {"e2e": part_e2e, "memory": part_memory, "flat": part_flat, "gpu": part_gpu}[part]
                text, missed = runner(work, opts)
            sections.append(f"## {part}\n\n{text}\n\n_{time.perf_counter() - t0:.0f} s, load average (1 min) "
                            f"{before:.2f} before, {load():.2f} after._")
            failed += missed
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if opts.quick:
        verdict = "--quick: no verdict (small shapes are fixed costs)" + (f"; would miss: {'; '.join(failed)}"
                                                                          if failed else "")
    else:
        verdict = "**FAILED**: " + "; ".join(failed) if failed else "**all bars met**"
    doc = (f"# lowrank-tools benchmarks\n\nCommand: `{command}` (from the repository root; "
           f"{(time.time() - started) / 60:.1f} min, finished {time.strftime('%Y-%m-%d %H:%M %Z')})\n\n"
           f"Machine: {machine(opts.device)}\n\n" + "\n\n".join(sections) + f"\n\n## Verdict\n\n{verdict}\n")
    print(doc)
    if output is not None:
        if opts.merge and output.exists():
            stamp = f"_Section(s) {', '.join(parts)} from `{command}` on {machine(opts.device)}._"
            doc = merge_sections(output.read_text(), [f"{sec}\n\n{stamp}" for sec in sections])
        output.write_text(doc)
        print(f"wrote {output}", file=sys.stderr)
    return 1 if failed and not opts.quick else 0


if __name__ == "__main__":
    sys.exit(main())
