"""The static sm_90 check: what each kept config of the attention kernels becomes in SASS, with and
without a map, stored as JSON and rendered into docs/attention.md.

    PYTHONPATH=benchmarks python -m srdiff_bench.sass_sm90                        # bf16, D = 64 and 128, every kept config
    PYTHONPATH=benchmarks python -m srdiff_bench.sass_sm90 --head-dims 64 --dtype fp16 --out /tmp/x.json

Each kernel is compiled as the JIT would (benchmarks/srdiff_bench/compile_sm90.py: the launchers' own arguments,
so the JIT's specialisation) twice: with a map (HAS_FAM, and FAM_GRAD in dK/dV) and without one. The
unmodulated compile is the in-house baseline: the same source with the modulation compiled out. Per
compile the cubin gives:

* the main loop's instruction mix per warp and iteration: the first loop in program order that
  issues an MMA (the loop over full blocks; the ragged tail has its own), counted from its label to
  its backward branch, by opcode and by class (MMA, FMUL, FFMA, packed half-precision FMA, MUFU,
  loads, barriers, ...), and the shapes of its wgmma (HGMMA) instructions;
* registers a thread and local memory (spills) from ``cuobjdump -res-usage``, spill stores/loads
  (STL/LDL) anywhere in the kernel and in the main loop;
* CTAs per SM from registers and from shared memory (Hopper: 64 K registers allocated per warp in
  units of 256, 228 KiB of shared memory with 1 KiB reserved per CTA, at most 64 warps and 32 CTAs).

SASS per warp is the instruction stream every warp issues, so the counts compare kernels of equal
tiles directly; they are not timings. Only a GPU run measures time (benchmarks/gpu.sh).
"""

import argparse
import datetime
import os
import re
import subprocess
import tempfile
from collections import Counter

import torch
import triton

from srdiff_bench.compile_sm90 import DTYPES, KERNELS, captured_launches, compile_as_jit
from srdiff_bench.store import write_json
import srdiff.kernels.fam_attention as K

RESULTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "results", "sm90-static")
NV_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")

# Hopper (sm_90) per-SM limits (CUDA occupancy calculator, compute capability 9.0).
REGISTERS_PER_SM, REGISTER_UNIT_PER_WARP = 65536, 256
SHARED_PER_SM, SHARED_RESERVED_PER_CTA = 228 * 1024, 1024
MAX_WARPS_PER_SM, MAX_CTAS_PER_SM = 64, 32

# Opcode (before the first dot) -> class. Anything else counts as "other".
CLASSES = {
    "mma": {"HGMMA", "HMMA"},
    "fmul": {"FMUL"},
    "ffma": {"FFMA"},
    "fadd": {"FADD"},
    "fmnmx": {"FMNMX"},
    "half": {"HFMA2", "HMUL2", "HADD2", "HMNMX2"},
    "mufu": {"MUFU"},
    "convert": {"F2FP", "F2F", "I2F", "F2I", "I2FP", "F2IP"},
    "loads": {"LDS", "LDSM", "LDG", "LDGSTS", "UTMALDG", "LD", "LDL", "UBLKCP"},
    "stores": {"STS", "STG", "STL", "ST", "STSM", "UTMASTG", "RED", "ATOM", "ATOMG"},
    "barriers": {"BAR", "SYNCS", "WARPGROUP", "DEPBAR", "LDGDEPBAR", "MEMBAR", "FENCE", "WARPSYNC",
                 "ARRIVES"},
    "shuffles": {"SHFL"},
    "integer": {"IMAD", "IADD3", "LEA", "LOP3", "SHF", "SEL", "ISETP", "MOV", "PRMT", "IABS", "IMNMX", "LDC",
                "S2R", "S2UR", "PLOP3", "FSETP", "FSEL", "VIADD", "R2UR", "CS2R", "P2R", "R2P", "IMUL",
                "SGXT", "LOP", "BMSK", "POPC", "FLO"},
    "branch": {"BRA", "NOP"},
}
CLASS_OF = {opcode: name for name, opcodes in CLASSES.items() for opcode in opcodes}


def class_of(opcode: str) -> str:
    """The class of ``opcode``; the uniform datapath's (U*: one per warp, for addresses, descriptors
    and loop counters) together, whatever they compute."""
    if opcode in CLASS_OF:
        return CLASS_OF[opcode]
    return "uniform" if opcode.startswith("U") else "other"

_INSTRUCTION = re.compile(r"^\s*/\*[0-9a-f]+\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)(\.[^ ]*)?\s*(.*?)\s*;")
_LABEL = re.compile(r"^(\.L_x_\d+):")
_BRANCH_TARGET = re.compile(r"`\((\.L_x_\d+)\)")


def _tool(name: str, *args: str) -> str:
    done = subprocess.run([os.path.join(NV_BIN, name), *args], capture_output=True, text=True, check=True)
    return done.stdout


def disassemble(cubin: bytes) -> list[tuple[str, str, str, str]]:
    """(label or "", predicate, opcode, modifiers + operands) per SASS line of ``cubin``; label lines
    carry an empty opcode."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        text = _tool("nvdisasm", "-c", path)
    lines = []
    for line in text.splitlines():
        label = _LABEL.match(line)
        if label:
            lines.append((label.group(1), "", "", ""))
            continue
        ins = _INSTRUCTION.match(line)
        if ins:
            predicate, opcode, modifiers, operands = ins.groups()
            lines.append(("", (predicate or "").strip(), opcode, (modifiers or "") + " " + operands))
    return lines


def main_loop(lines) -> list[tuple[str, str, str]]:
    """The instructions (predicate, opcode, rest) of the first loop, in program order, that contains
    an MMA: from its label to the backward branch that closes it."""
    labels = {line[0]: i for i, line in enumerate(lines) if line[0]}
    loops = []
    for i, (_, _, opcode, rest) in enumerate(lines):
        target = _BRANCH_TARGET.search(rest) if opcode == "BRA" else None
        if target and labels.get(target.group(1), i) < i:
            loops.append((labels[target.group(1)], i))
    for start, end in sorted(loops):
        body = [line[1:] for line in lines[start:end + 1] if line[2]]
        if any(class_of(opcode) == "mma" for _, opcode, _ in body):
            return body
    raise ValueError("no loop with an MMA instruction")


def instruction_mix(body) -> dict:
    """Counts of the loop's instructions: total, per class, per opcode, and the wgmma shapes.
    Instructions predicated on !PT (never executed: scheduling placeholders) count as "nop"."""
    opcodes, classes, shapes = Counter(), Counter(), Counter()
    for predicate, opcode, rest in body:
        if predicate == "@!PT":
            classes["nop"] += 1
            continue
        opcodes[opcode] += 1
        classes[class_of(opcode)] += 1
        if opcode in ("HGMMA", "HMMA"):
            shapes[f"{opcode}.{rest.split()[0].lstrip('.').split('.')[0]}"] += 1
    return {"total": len(body), "classes": dict(sorted(classes.items())),
            "opcodes": dict(sorted(opcodes.items())), "mma_shapes": dict(sorted(shapes.items()))}


def resource_usage(cubin: bytes) -> dict:
    """Registers a thread and local memory bytes (spills, stack arrays) of the kernel in ``cubin``."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        text = _tool("cuobjdump", "-res-usage", path)
    usage = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", text)
    return {"registers": int(usage.group(1)), "stack_bytes": int(usage.group(2)),
            "local_bytes": int(usage.group(3))}


def ctas_per_sm(registers: int, warps: int, shared: int) -> dict:
    """Resident CTAs per SM as limited by registers, by shared memory, and both (with warps, CTAs)."""
    per_warp = -(-registers * 32 // REGISTER_UNIT_PER_WARP) * REGISTER_UNIT_PER_WARP
    by_registers = REGISTERS_PER_SM // (per_warp * warps)
    by_shared = SHARED_PER_SM // (shared + SHARED_RESERVED_PER_CTA)
    return {"by_registers": by_registers, "by_shared": by_shared,
            "ctas": min(by_registers, by_shared, MAX_WARPS_PER_SM // warps, MAX_CTAS_PER_SM)}


def analyse(compiled, num_warps: int) -> dict:
    cubin = compiled.asm["cubin"]
    lines = disassemble(cubin)
    usage = resource_usage(cubin)
    spill_instructions = Counter(opcode for _, _, opcode, _ in lines if opcode in ("STL", "LDL"))
    loop = main_loop(lines)
    return {**usage, "spill_stores": spill_instructions["STL"], "spill_loads": spill_instructions["LDL"],
            "loop_spills": sum(opcode in ("STL", "LDL") for _, opcode, _ in loop),
            "shared_bytes": compiled.metadata.shared,
            **ctas_per_sm(usage["registers"], num_warps, compiled.metadata.shared),
            "main_loop": instruction_mix(loop)}


def survey(dtype: torch.dtype, head_dims, kernels=tuple(KERNELS.values()), progress=print) -> list[dict]:
    """One row per (kernel, head dim, kept config, modulated or not) of the named ``kernels``."""
    rows = []
    for head_dim in head_dims:
        for modulated in (False, True):
            for kernel, args, meta in captured_launches(dtype, head_dim, modulated=modulated):
                if KERNELS[kernel] not in kernels:
                    continue
                for config in K.kept_configs(kernel, dtype, head_dim, modulated):
                    options = K.config_options(config)
                    compiled = compile_as_jit(kernel.fn, args, {**meta, **options})
                    row = {"kernel": KERNELS[kernel], "D": head_dim, "modulated": modulated,
                           "config": options, **analyse(compiled, config.num_warps)}
                    rows.append(row)
                    tiles = (f"{options['BLOCK_M']}x{options['BLOCK_N']} w{options['num_warps']} "
                             f"s{options['num_stages']}")
                    progress(f"{row['kernel']:>4} D={head_dim:<3} {tiles} {'fam' if modulated else 'off'}: "
                             f"loop {row['main_loop']['total']} instr, {row['registers']} regs, "
                             f"{row['spill_stores']} STL, {row['ctas']} CTA/SM")
    return rows


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short=8", "HEAD"], capture_output=True, text=True,
                              check=True, cwd=os.path.dirname(RESULTS)).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("SRDIFF_COMMIT", "unknown")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", choices=DTYPES, default="bf16")
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--kernels", nargs="+", choices=list(KERNELS.values()),
                        default=list(KERNELS.values()))
    parser.add_argument("--out", help="JSON file to write (default: benchmarks/results/sm90-static/"
                                      "<stamp>_<commit>.json)")
    args = parser.parse_args(argv)
    stamp = datetime.datetime.now(datetime.timezone.utc)
    commit = _commit()
    rows = survey(DTYPES[args.dtype], args.head_dims, args.kernels)
    out = args.out or os.path.join(RESULTS, f"{stamp:%Y%m%dT%H%M%SZ}_{commit}.json")
    if os.path.exists(out):
        raise SystemExit(f"{out} exists: refusing to replace it")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    record = {"datetime": stamp.isoformat(timespec="seconds"), "commit": commit, "target": "sm_90a",
              "triton": triton.__version__, "torch": torch.__version__, "dtype": args.dtype, "rows": rows}
    write_json(out, record)
    print(f"wrote {out}; next: PYTHONPATH=benchmarks python -m srdiff_bench.report")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
